"""Evasion perturbations for the out-of-distribution benchmark: what spammers do to slip past a filter.

Each perturbation is a function `(text, rng) -> text`, deterministic for a given `random.Random`; the
benchmark seeds one generator per (seed, perturbation, row), so a rerun perturbs every message the same
way. A perturbation that finds nothing to change in a message returns it unchanged, and the benchmark then
leaves that message out of the perturbation's scope (it would only dilute the recall drop).

Some of these the shared normaliser undoes by design (full-width forms through NFKC, zero-width characters,
Cyrillic/Greek look-alikes inside Latin words, letter-by-letter spacing: serving/text.py): training and
serving gain from that together. The others (leetspeak, emoji noise, traditional characters, split URLs)
the model has to read through (folding traditional characters in the normaliser was measured and lost:
README "What was tried").
"""

from __future__ import annotations

import random
import re
from typing import Callable

# Latin letter -> look-alikes from other scripts (Cyrillic, Greek), after Unicode's confusables list.
HOMOGLYPHS = {
    "a": "а", "c": "с", "e": "е", "i": "і", "j": "ј", "o": "ο", "p": "р", "s": "ѕ", "x": "х", "y": "у",
    "A": "Α", "B": "В", "C": "С", "E": "Е", "H": "Н", "I": "І", "K": "К", "M": "М", "N": "Ν", "O": "О",
    "P": "Р", "T": "Т", "X": "Х", "Y": "Υ",
}
LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7", "l": "1", "g": "9"}
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff")
NOISE = ("🔥", "💰", "🎁", "✨", "★", "☆", "!!", "~", "…", "※", "♥", "👉", "✅", "【", "】", "*", "#")
_URL = re.compile(r"(?:https?://|www\.)\S+|\b[a-z0-9-]+\.(?:com|cn|net|org|top|xyz|cc|co|kr|jp|tk|me|ly)\b\S*",
                  re.IGNORECASE)
_LATIN_WORD = re.compile(r"[A-Za-z]{3,}")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_KANA_HANGUL = re.compile(r"[\u3040-\u30ff\uac00-\ud7af]")


def homoglyph(text: str, rng: random.Random, share: float = 0.3) -> str:
    return "".join(HOMOGLYPHS[c] if c in HOMOGLYPHS and rng.random() < share else c for c in text)


def zero_width(text: str, rng: random.Random, share: float = 0.3) -> str:
    out = []
    for i, c in enumerate(text):
        out.append(c)
        if i + 1 < len(text) and not c.isspace() and not text[i + 1].isspace() and rng.random() < share:
            out.append(rng.choice(ZERO_WIDTH))
    return "".join(out)


def spacing(text: str, rng: random.Random, share: float = 0.4) -> str:
    """Letter-by-letter spacing of some Latin words ("f r e e") and of runs of CJK characters."""
    text = _LATIN_WORD.sub(lambda m: " ".join(m.group()) if rng.random() < share else m.group(), text)
    out = []
    for i, c in enumerate(text):
        out.append(c)
        if _CJK.match(c) and i + 1 < len(text) and _CJK.match(text[i + 1]) and rng.random() < share:
            out.append(" ")
    return "".join(out)


def leetspeak(text: str, rng: random.Random, share: float = 0.4) -> str:
    return "".join(LEET[c] if c in LEET and rng.random() < share else c for c in text)


def fullwidth(text: str, rng: random.Random, share: float = 0.7) -> str:
    """ASCII letters, digits and punctuation as their full-width forms (U+FF01..U+FF5E)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" and rng.random() < share else c for c in text)


def punct_emoji(text: str, rng: random.Random, share: float = 0.25) -> str:
    parts = re.split(r"(\s+)", text)
    out = []
    for p in parts:
        out.append(p)
        if p and not p.isspace() and rng.random() < share:
            out.append(rng.choice(NOISE))
    if _CJK.search(text):  # no spaces to hang noise on: between characters too
        chars = []
        for c in "".join(out):
            chars.append(c)
            if _CJK.match(c) and rng.random() < share / 3:
                chars.append(rng.choice(NOISE))
        out = chars
    return "".join(out)


_S2T = None


def zh_traditional(text: str, rng: random.Random) -> str:
    """Simplified Chinese written in traditional characters (OpenCC's s2t tables). Chinese text only: text
    with kana or Hangul is Japanese or Korean, whose characters no spammer rewrites this way."""
    global _S2T
    if not _CJK.search(text) or _KANA_HANGUL.search(text):
        return text
    if _S2T is None:
        from opencc import OpenCC

        _S2T = OpenCC("s2t")
    return _S2T.convert(text)


def split_url(text: str, rng: random.Random) -> str:
    """URLs and bare domains broken the way spam writes them: 'hxxp', '[.]', ' . ', spaces after '://'."""
    def one(m: re.Match) -> str:
        url = m.group()
        style = rng.randrange(4)
        if style == 0:
            url = url.replace(".", "[.]")
        elif style == 1:
            url = url.replace(".", " . ")
        elif style == 2:
            url = re.sub(r"^http", "hxxp", url, flags=re.IGNORECASE).replace("://", ":// ")
        else:
            url = url.replace(".", " dot ")
        return url
    return _URL.sub(one, text)


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "homoglyph": homoglyph,
    "zero_width": zero_width,
    "spacing": spacing,
    "leetspeak": leetspeak,
    "fullwidth": fullwidth,
    "punct_emoji": punct_emoji,
    "zh_traditional": zh_traditional,
    "split_url": split_url,
}


def combined(text: str, rng: random.Random) -> str:
    """Two or three of the others in a row, picked per message."""
    names = rng.sample(sorted(PERTURBATIONS), rng.choice((2, 3)))
    for name in names:
        text = PERTURBATIONS[name](text, rng)
    return text


PERTURBATIONS["combined"] = combined

# the ones the shared normaliser undoes (serving/text.py; tests/test_evasion.py checks it): copying training rows
# through them would only repeat the rows (training/augment.py refuses them)
UNDONE_BY_NORMALISER = ("fullwidth", "homoglyph", "zero_width")


def perturb(texts: list[str], name: str, seed: int) -> list[str]:
    """`texts` perturbed by `name`, one seeded generator per row: the same output on every run."""
    fn = PERTURBATIONS[name]
    return [fn(t, random.Random(f"{seed}:{name}:{i}")) for i, t in enumerate(texts)]
