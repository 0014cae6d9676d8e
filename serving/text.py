"""Text preparation shared by training and serving: normalisation, language tags, tokenisation + truncation.

This module is the single definition of how a message becomes model input. Training imports it; the
server imports it; the bundle records its settings (`TextSettings`) so both sides agree. It depends on
the standard library and (for `Encoder`) the `tokenizers` package only: never torch or transformers.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Sequence

# ------------------------------------------------------------------------------------------ normalisation

# Zero-width and invisible format characters that spammers use to split words ("f\u200bree").
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e"))
_WS = re.compile(r"\s+")
_DIGIT = re.compile(r"[0-9]")


_CC = re.compile("[\x00-\x1f\x7f-\x9f]")  # exactly Unicode category Cc


def _strip_controls(text: str) -> str:
    # Cc (controls) become spaces so "a\tb" stays two words; Cf (format) characters vanish.
    text = _CC.sub(" ", text)
    if text.isprintable():  # the common case: no Cf left, nothing else to strip
        return text
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            out.append(" ")
        elif cat == "Cf":
            continue
        else:
            out.append(ch)
    return "".join(out)


# Bumped whenever normalize() or language_tag() changes what it returns: prepared data from an older
# version is prepared again (training.data.PIPELINE_VERSION includes it).
NORMALIZER_VERSION = 4

# Cyrillic and Greek letters that look like Latin ones (after Unicode's confusables list). Spammers put
# them inside English words ("Frее" with Cyrillic е) to dodge word filters; a word that mixes them with
# ASCII letters is folded back to Latin. Words written wholly in Cyrillic or Greek are left alone.
_CONFUSABLES = {
    "а": "a", "с": "c", "е": "e", "і": "i", "ј": "j", "о": "o", "ο": "o", "р": "p", "ѕ": "s", "х": "x",
    "у": "y", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "ν": "v", "α": "a", "ι": "i", "κ": "k", "τ": "t",
    "Α": "A", "В": "B", "Β": "B", "С": "C", "Е": "E", "Ε": "E", "Н": "H", "Η": "H", "І": "I", "Ι": "I",
    "Ј": "J", "К": "K", "Κ": "K", "М": "M", "Μ": "M", "Ν": "N", "О": "O", "Ο": "O", "Р": "P", "Ρ": "P",
    "Ѕ": "S", "Т": "T", "Τ": "T", "Х": "X", "Χ": "X", "Υ": "Y", "Ү": "Y", "Ζ": "Z",
}
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLES)
_CONFUSABLE_CHAR = re.compile("[" + "".join(_CONFUSABLES) + "]")
_WORD = re.compile(r"[^\W\d_]+")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_CYRILLIC_GREEK = re.compile(r"[\u0370-\u03ff\u0400-\u052f]")
# Four or more single letters (Latin, CJK, Hangul, ...) separated by single spaces: "F R E E", "免 费 领 取".
_SPACED_LETTERS = re.compile(r"(?<!\S)[^\W\d_](?: [^\W\d_]){3,}(?!\S)")


def _fold_confusables(text: str) -> str:
    if not _CONFUSABLE_CHAR.search(text):  # the common case costs one regex scan
        return text
    if not any(c not in _CONFUSABLES for c in _CYRILLIC_GREEK.findall(text)):
        # every Cyrillic/Greek letter is a look-alike: no real Cyrillic or Greek word here to protect
        return text.translate(_CONFUSABLE_TABLE)
    return _WORD.sub(lambda m: m.group().translate(_CONFUSABLE_TABLE)
                     if _ASCII_LETTER.search(m.group()) else m.group(), text)


def normalize(text: str, mask_digits: bool = False) -> str:
    """NFKC (full-width -> half-width), HTML entities decoded, zero-width/control characters removed,
    Cyrillic/Greek look-alikes inside Latin words folded to Latin, letter-by-letter spacing ("F R E E")
    joined, whitespace collapsed, optionally every ASCII digit masked as 'x'. CJK characters are left intact
    (NFKC maps only compatibility forms such as half-width katakana to their standard form)."""
    text = unicodedata.normalize("NFKC", text)
    if "&" in text:
        text = html.unescape(text)
    text = text.translate(_INVISIBLE)
    text = _strip_controls(text)
    text = _WS.sub(" ", text).strip()
    text = _fold_confusables(text)
    if mask_digits:
        text = _DIGIT.sub("x", text)
    # after masking: masked digits are letters too, so a second pass finds nothing new (idempotent)
    return _SPACED_LETTERS.sub(lambda m: m.group().replace(" ", ""), text)


def _nfkc_groups(text: str) -> list[tuple[int, int]]:
    """Source spans that NFKC can normalise independently: each starter with its combining marks, merged
    with the next one whenever normalising the two apart differs from normalising them together (Hangul
    jamo, composing vowel signs, marks that reorder). NFKC(text) is the concatenation of NFKC(group)."""
    starts = [i for i, ch in enumerate(text) if i == 0 or not unicodedata.combining(ch)]
    bounds = list(zip(starts, starts[1:] + [len(text)]))
    nfkc = unicodedata.normalize
    if "".join(nfkc("NFKC", text[a:b]) for a, b in bounds) == nfkc("NFKC", text):
        return bounds  # the common case: no piece interacts with its neighbour
    groups = [bounds[0]]
    for a, b in bounds[1:]:
        ga, gb = groups[-1]
        if nfkc("NFKC", text[ga:b]) == nfkc("NFKC", text[ga:gb]) + nfkc("NFKC", text[a:b]):
            groups.append((a, b))
        else:
            groups[-1] = (ga, b)
    if "".join(nfkc("NFKC", text[a:b]) for a, b in groups) != nfkc("NFKC", text):
        return [(0, len(text))]  # never seen; one group is coarse but still exact
    return groups


def normalize_with_offsets(text: str, mask_digits: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """`normalize(text, mask_digits)` and, for each of its characters, the span [start, end) of `text` it
    came from (Python str indices). A character made from several (an HTML entity, a composed character,
    a whitespace run) maps to all of them; one that expands into several (NFKC "㍿" -> "株式会社")
    gives each of those the same span. Characters that normalisation removes (zero-width, format,
    leading/trailing space, the spaces of "F R E E") map to nothing; a span of the output taken from the
    first character's start to the last one's end covers what was removed inside it.

    The same steps as `normalize`, carrying a span per character; tests check the text equals
    `normalize`'s on many inputs. Slower than `normalize` (explanations, not data preparation, use it)."""
    chars: list[str] = []
    spans: list[tuple[int, int]] = []
    for a, b in _nfkc_groups(text) if text else []:  # NFKC
        for ch in unicodedata.normalize("NFKC", text[a:b]):
            chars.append(ch)
            spans.append((a, b))

    def rebuild(pieces: list[tuple[str, tuple[int, int]]]) -> None:
        chars[:] = [c for c, _ in pieces]
        spans[:] = [s for _, s in pieces]

    s = "".join(chars)
    if "&" in s:  # HTML entities, exactly as html.unescape finds and replaces them
        out, pos = [], 0
        for m in html._charref.finditer(s):  # type: ignore[attr-defined]
            out += zip(chars[pos:m.start()], spans[pos:m.start()])
            span = (spans[m.start()][0], spans[m.end() - 1][1])
            out += [(c, span) for c in html._replace_charref(m)]  # type: ignore[attr-defined]
            pos = m.end()
        out += zip(chars[pos:], spans[pos:])
        rebuild(out)
    # invisible characters removed; controls (Cc) become spaces, other format characters (Cf) vanish
    out = []
    for c, span in zip(chars, spans):
        if ord(c) in _INVISIBLE:
            continue
        cat = unicodedata.category(c)
        if cat == "Cc":
            out.append((" ", span))
        elif cat != "Cf":
            out.append((c, span))
    rebuild(out)
    s = "".join(chars)
    out, pos = [], 0  # whitespace runs -> one space spanning the run; then strip
    for m in _WS.finditer(s):
        out += zip(chars[pos:m.start()], spans[pos:m.start()])
        out.append((" ", (spans[m.start()][0], spans[m.end() - 1][1])))
        pos = m.end()
    out += zip(chars[pos:], spans[pos:])
    rebuild(out)
    s = "".join(chars)
    lead = len(s) - len(s.lstrip())
    keep = len(s.strip())
    s, spans = s[lead:lead + keep], spans[lead:lead + keep]
    s = _fold_confusables(s)  # one character for one: spans unchanged
    if mask_digits:
        s = _DIGIT.sub("x", s)
    out, pos = [], 0  # spaced letters joined: the spaces inside a match dropped
    for m in _SPACED_LETTERS.finditer(s):
        out += zip(s[pos:m.start()], spans[pos:m.start()])
        out += [(c, sp) for c, sp in zip(s[m.start():m.end()], spans[m.start():m.end()]) if c != " "]
        pos = m.end()
    out += zip(s[pos:], spans[pos:])
    return "".join(c for c, _ in out), [sp for _, sp in out]


# ------------------------------------------------------------------------------------------ language tag

LANGS = ("zh", "ja", "ko", "en", "mixed", "other")


def _script(ch: str) -> str | None:
    o = ord(ch)
    if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9D:
        return "kana"
    if 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
        return "hangul"
    if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F:
        return "han"
    if ch.isalpha():
        if o < 0x250 or 0x1E00 <= o <= 0x1EFF:
            return "latin"
        return "other"
    return None


def language_tag(text: str) -> str:
    """zh / ja / ko / en / mixed / other, by script (no statistical model).

    Kana marks Japanese (which also uses Han), Hangul marks Korean, Han alone is Chinese, Latin is
    English here (the corpora's only Latin-script language). A text whose letters are split between a
    CJK language and Latin (each at least a quarter, counting a CJK character as two Latin letters since
    one ideograph carries about a word) is "mixed"; no letters at all is "other".
    """
    counts = {"kana": 0, "hangul": 0, "han": 0, "latin": 0, "other": 0}
    for ch in text:
        if ch == "x":  # what masked digits become (normalize): a CJK bank alert full of amounts is not English
            continue
        s = _script(ch)
        if s:
            counts[s] += 1
    cjk = counts["kana"] + counts["hangul"] + counts["han"]
    if counts["kana"] and counts["kana"] >= 0.05 * cjk:
        cjk_lang = "ja"
    elif counts["hangul"] and counts["hangul"] >= counts["han"]:
        cjk_lang = "ko"
    elif counts["han"]:
        cjk_lang = "zh"
    else:
        cjk_lang = None
    weights = {"cjk": 2 * cjk, "latin": counts["latin"], "other": counts["other"]}
    total = sum(weights.values())
    if total == 0:
        return "other"
    if cjk_lang and weights["latin"] >= 0.25 * total and weights["cjk"] >= 0.25 * total:
        return "mixed"
    top = max(weights, key=weights.get)
    if top == "cjk":
        return cjk_lang  # type: ignore[return-value]
    return "en" if top == "latin" else "other"


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class TextSettings:
    """Everything that turns raw text into model input; written to bundle.json and read back by serving."""

    mask_digits: bool = True
    max_length: int = 128
    truncation: str = "head"  # head | head_tail
    head_tokens: int = 0  # head_tail: tokens of the head (0 = two thirds of the content budget)
    # NORMALIZER_VERSION of the code that prepared the model's training text (None: not recorded, older
    # models). Serving normalises with its own version and warns when the two differ.
    normalizer_version: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextSettings":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def normalizer_mismatch(self) -> str | None:
        """Why this model's text may be normalised differently here than in its training, or None."""
        if self.normalizer_version is None or self.normalizer_version == NORMALIZER_VERSION:
            return None
        return (f"the model was trained on text normalised by version {self.normalizer_version} of "
                f"serving/text.py and this code normalises with version {NORMALIZER_VERSION}: scores may "
                "differ from the ones measured at training (retrain, or serve it with the matching version)")

    def __post_init__(self):
        if self.truncation not in ("head", "head_tail"):
            raise ValueError(f"truncation must be 'head' or 'head_tail', got {self.truncation!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        # checked here, not only in Encoder, so a config mistake fails before data preparation and training
        if self.head_tokens < 0 or (self.truncation == "head_tail" and self.head_tokens > self.max_length - 2):
            raise ValueError(f"head_tokens must be 0 (two thirds) or in 1..{self.max_length - 2} "
                             f"(max_length - 2), got {self.head_tokens}")


# ------------------------------------------------------------------------------------------ encoder


@dataclass
class Encoded:
    input_ids: list[int]
    truncated: bool


class Encoder:
    """Tokenise normalised text with a `tokenizers.Tokenizer` (a tokenizer.json) and apply the truncation
    policy on token ids, then add the special tokens. Training and serving both call this, so a message is
    cut the same way everywhere.

    head:      the first max_length-2 content tokens.
    head_tail: the first `head_tokens` and the last (budget - head_tokens) content tokens: spam often
               hides its call to action (link, number, unsubscribe line) at the end of a long e-mail.
    """

    def __init__(self, tokenizer, settings: TextSettings):
        self.tok = tokenizer
        self.settings = settings
        self.budget = settings.max_length - 2
        self.head = settings.head_tokens or (2 * self.budget) // 3
        if settings.truncation == "head_tail" and not 0 < self.head <= self.budget:
            raise ValueError(f"head_tokens must be in 1..{self.budget}")
        self.cls_id, self.sep_id, self.pad_id = self._special_ids()
        # Characters beyond this never reach the model: cap them before tokenising a 200 kB e-mail.
        self.char_cap = 12 * settings.max_length

    @classmethod
    def from_file(cls, path: str, settings: TextSettings) -> "Encoder":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), settings)

    def _special_ids(self) -> tuple[int, int, int]:
        vocab = self.tok.get_vocab()

        def first(*names):
            for n in names:
                if n in vocab:
                    return vocab[n]
            raise ValueError(f"tokenizer has none of the special tokens {names}")

        return first("<s>", "[CLS]"), first("</s>", "[SEP]"), first("<pad>", "[PAD]")

    def cap_chars(self, text: str) -> str:
        """The part of a (normalised) text that can reach the model under this policy."""
        if len(text) <= self.char_cap:
            return text
        if self.settings.truncation == "head":
            return text[: self.char_cap]
        half = self.char_cap // 2
        return text[:half] + " " + text[-half:]

    def _kept(self, n: int) -> slice | tuple[slice, slice]:
        """Which of a text's `n` content tokens the truncation policy keeps."""
        if n <= self.budget:
            return slice(0, n)
        if self.settings.truncation == "head":
            return slice(0, self.budget)
        return slice(0, self.head), slice(n - (self.budget - self.head), n)

    def _truncate(self, items: list) -> list:
        kept = self._kept(len(items))
        return items[kept] if isinstance(kept, slice) else items[kept[0]] + items[kept[1]]

    def encode_batch(self, texts: Sequence[str]) -> list[Encoded]:
        """`texts` must already be normalised (see `normalize`)."""
        raw = self.tok.encode_batch([self.cap_chars(t) for t in texts], add_special_tokens=False)
        out = []
        for t, enc in zip(texts, raw):
            ids = self._truncate(enc.ids)
            truncated = len(enc.ids) > self.budget or len(t) > self.char_cap
            out.append(Encoded([self.cls_id, *ids, self.sep_id], truncated))
        return out

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[Encoded, list[tuple[int, int] | None]]]:
        """`encode_batch`, and for each token of each Encoded the span [start, end) of the normalised text
        it was read from (None for the special tokens). The tokenizer's offsets are into `cap_chars(text)`;
        head_tail's joining space maps to nothing, the tail back to the end of `text`."""
        raw = self.tok.encode_batch([self.cap_chars(t) for t in texts], add_special_tokens=False)
        out = []
        for t, enc in zip(texts, raw):
            offsets: list[tuple[int, int] | None] = list(enc.offsets)
            if len(t) > self.char_cap and self.settings.truncation == "head_tail":
                half = self.char_cap // 2
                shift = len(t) - half - (half + 1)  # capped index -> index in `t`, past the joining space

                def back(a: int, b: int) -> tuple[int, int] | None:
                    if b <= half:
                        return a, b
                    if a < half:  # across the joining space (never seen: it splits words): the head part
                        return a, half
                    a = max(a, half + 1)
                    return (a + shift, b + shift) if a < b else None

                offsets = [back(a, b) for a, b in offsets]
            ids = self._truncate(enc.ids)
            truncated = len(enc.ids) > self.budget or len(t) > self.char_cap
            out.append((Encoded([self.cls_id, *ids, self.sep_id], truncated), [None, *self._truncate(offsets), None]))
        return out

    def pad(self, batch: Iterable[Encoded]):
        """Right-pad to the longest sequence in the batch (dynamic padding). Returns numpy int64 arrays."""
        import numpy as np

        batch = list(batch)
        width = max(len(e.input_ids) for e in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = e.input_ids
            mask[i, : len(e.input_ids)] = 1
        return ids, mask
