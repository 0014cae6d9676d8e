"""Why is this spam? Attributions over spans of the text as sent: decomposition, else occlusion.

    decompose_many(texts, encoder, token_score) -> [Attribution]       (mean-pooled models: one pass)
    attribute(text, score, max_rows=32) -> Attribution(p_spam, spans, effects)          (occlusion)
    explain(text, score, max_rows=32, top=5) -> {"spans": [{"start", "end", "text", "effect"}, ...], "method"}
    explainer_for(predict) -> (method, explain_texts(texts, max_rows) -> [explanation])   (the server's)

Decomposition (method "decomposition", a bundle whose graph has `token_scores`, training/token_scores.py): a
mean-pooled model's spam-minus-ham logit is exactly z = sum_i t_i + bias over its tokens, t_i = (w_spam -
w_ham) . h_i / n, from the pass that classifies the text. A unit's contribution c is the sum of its tokens'
t_i (a token that straddles units split by character overlap; special tokens and spaces belong to no unit),
and its effect is p(spam) - sigmoid(z - c): the probability without that unit's contribution, every other
token's hidden state kept as it was. That is first-order: removing the words would also change the other
tokens' hidden states through attention (and n), which occlusion measures and this does not. Every unit
is scored (no row cap: one graph call per request whatever the units); tokens the truncation dropped
contribute nothing, so their units get effect 0 and are not reported.

Occlusion (method "occlusion", any other model): the text is cut into units (words; short chunks of CJK runs), each unit is removed in turn, and every
variant is scored together with the full text in ONE call of `score(list[str]) -> np.ndarray` (p(spam)
of raw texts, normalised by the scorer as always). A unit's effect is p(spam | full text) - p(spam | text
without it): > 0 means the unit raised the spam probability. At most `max_rows` variants per text: with
more units, adjacent units are merged into `max_rows` spans first, so the cost of explaining a text is
bounded by one model call on max_rows + 1 rows.

Offsets are Python str indices (Unicode code points, not UTF-16 units) into the text as sent; they come
from `serving.text.normalize_with_offsets`, so they hold through NFKC, HTML entities, zero-width
characters and collapsed whitespace. The scorer is the only model-specific part: `onnx_scorer(Classifier)`
for the server and the benchmarks, and training/evaluate.py passes its PyTorch path, so both explain with
the same code. numpy and serving.text only: no torch, no transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from serving.text import normalize_with_offsets

Scorer = Callable[[list[str]], np.ndarray]

MAX_ROWS = 32  # variants per text besides the full text (server default: --explain-max-rows)
TOP = 5  # spans returned that raised, and as many that lowered, p(spam)

# Han ideographs (with the compatibility and extension blocks) and kana: scripts written without spaces.
# Hangul is left out: Korean puts spaces between words (eojeol), so its words are units like English ones.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_HIRAGANA = "\u3040-\u309f"
_KATAKANA = "\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9d"
_CJK_RUN = re.compile(f"[{_HAN}]+|[{_HIRAGANA}]+|[{_KATAKANA}]+")
_HAS_WORD_CHAR = re.compile(r"\w")
_WORD = re.compile(r"\S+")


@dataclass
class Attribution:
    text: str
    p_spam: float  # p(spam | full text), from the same call as the variants
    spans: list[tuple[int, int]]  # [start, end) in `text`, disjoint, in order
    effects: np.ndarray  # occlusion: p_spam - p(spam | text without the span); decomposition: see above
    rows: int  # rows the scorer was called with (occlusion: 1 + len(spans); decomposition: 1)
    method: str = "occlusion"
    contributions: np.ndarray | None = None  # decomposition: each span's share c of the logit z
    z: float | None = None  # decomposition: logit_spam - logit_ham of the full text


def _pieces(norm: str) -> list[tuple[int, int]]:
    """Units as [start, end) of the normalised text: a whitespace-delimited word, except that a run of Han
    or kana inside it is cut into chunks of 2 characters (3 for an odd last one). Why 2: Chinese words
    average under 2 characters and Japanese words split at script changes (kanji, hiragana, katakana) about
    as often, so a chunk is about a word without a dictionary, and the units are the same for every model
    (the tokenizer's pieces change with vocabulary trimming: a trimmed vocabulary cuts CJK text into single
    characters, which would spend the row budget on 1-character units). Punctuation-only pieces join the
    piece before them (or after, at the start of a word): removing "！" alone is rarely worth a row."""
    out: list[tuple[int, int]] = []
    for w in _WORD.finditer(norm):
        ws, we = w.span()
        parts: list[tuple[int, int]] = []
        pos = ws
        for m in _CJK_RUN.finditer(norm, ws, we):
            if m.start() > pos:
                parts.append((pos, m.start()))
            a, b = m.span()
            while b - a > 3:
                parts.append((a, a + 2))
                a += 2
            parts.append((a, b))
            pos = b
        if pos < we:
            parts.append((pos, we))
        merged: list[tuple[int, int]] = []
        for a, b in parts:
            if merged and not _HAS_WORD_CHAR.search(norm, a, b) and not _CJK_RUN.match(norm, a):
                merged[-1] = (merged[-1][0], b)  # punctuation joins the piece before it
            elif merged and not _HAS_WORD_CHAR.search(norm, *merged[-1]) and len(merged) == 1:
                merged[-1] = (merged[-1][0], b)  # a word that starts with punctuation: it joins the next
            else:
                merged.append((a, b))
        out += merged
    return out


def _units(text: str, mask_digits: bool) -> tuple[str, list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """(normalised text, units as spans of `text`, each unit's pieces in the normalised text)."""
    norm, src = normalize_with_offsets(text, mask_digits)
    spans: list[tuple[int, int]] = []
    pieces: list[list[tuple[int, int]]] = []
    for a, b in _pieces(norm):
        s, e = src[a][0], src[b - 1][1]
        if spans and s < spans[-1][1]:
            spans[-1] = (spans[-1][0], max(e, spans[-1][1]))
            pieces[-1].append((a, b))
        else:
            spans.append((s, e))
            pieces.append([(a, b)])
    return norm, spans, pieces


def units(text: str, mask_digits: bool = True) -> list[tuple[int, int]]:
    """The units of `text` (as sent) as disjoint [start, end) spans in order. Units are found on the
    normalised text and mapped back; units whose spans would overlap there (one source character that
    NFKC expands into two units) are merged."""
    return _units(text, mask_digits)[1]


def cap_spans(spans: Sequence[tuple[int, int]], max_rows: int) -> list[tuple[int, int]]:
    """At most `max_rows` spans: adjacent units merged into `max_rows` groups of consecutive units whose
    counts differ by at most one (a merged span covers what lies between its units too)."""
    spans = list(spans)
    if len(spans) <= max_rows:
        return spans
    groups = np.array_split(np.arange(len(spans)), max_rows)
    return [(spans[g[0]][0], spans[g[-1]][1]) for g in groups]


def remove(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """`text` without the given disjoint spans. Nothing takes their place: a word's removal leaves the
    spaces around it (collapsed by normalisation), and a CJK chunk's removal leaves its neighbours
    adjacent as they would be written, where an inserted space would add a token of its own."""
    out, pos = [], 0
    for a, b in sorted(spans):
        out.append(text[pos:a])
        pos = b
    out.append(text[pos:])
    return "".join(out)


def attribute(text: str, score: Scorer, max_rows: int = MAX_ROWS, mask_digits: bool = True) -> Attribution:
    """Occlusion effects of the text's units (merged to at most `max_rows` spans), from one scorer call on
    the full text and one variant per span."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    spans = cap_spans(units(text, mask_digits), max_rows)
    rows = [text] + [remove(text, [s]) for s in spans]
    p = np.asarray(score(rows), dtype=np.float64)
    if p.shape != (len(rows),):
        raise ValueError(f"the scorer returned shape {p.shape} for {len(rows)} texts")
    return Attribution(text, float(p[0]), spans, p[0] - p[1:], len(rows))


# ------------------------------------------------------------------------------------------ decomposition

# (encoded rows) -> (logits (n, 2), each row's token scores aligned with its input_ids): one model pass
TokenScorer = Callable[[list], tuple[np.ndarray, list[np.ndarray]]]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def unit_contributions(n_chars: int, pieces: Sequence[Sequence[tuple[int, int]]],
                       offsets: Sequence[tuple[int, int] | None], scores: np.ndarray) -> np.ndarray:
    """Each unit's share of the token scores: a token's score goes to the units its characters (offsets
    into the normalised text of `n_chars` characters) lie in, split by the number of characters in each;
    characters in no unit (spaces) and tokens without offsets (special tokens) give nothing to any unit."""
    owner = np.full(n_chars, -1, dtype=np.int64)
    for u, ps in enumerate(pieces):
        for a, b in ps:
            owner[a:b] = u
    c = np.zeros(len(pieces), dtype=np.float64)
    for off, t in zip(offsets, scores):
        if off is None or off[1] <= off[0]:
            continue
        own = owner[off[0]:off[1]]
        own = own[own >= 0]
        if own.size:
            np.add.at(c, own, float(t) / own.size)
    return c


def decompose_many(texts: Sequence[str], encoder, token_score: TokenScorer, mask_digits: bool = True) -> list[Attribution]:
    """Decomposition attributions of `texts` from ONE `token_score` call on all of them (see the module
    docstring): effect of a unit = sigmoid(z) - sigmoid(z - c_unit)."""
    found = [_units(t, mask_digits) for t in texts]
    encoded = encoder.encode_with_offsets([norm for norm, _, _ in found])
    if not texts:
        return []
    logits, scores = token_score([e for e, _ in encoded])
    logits = np.asarray(logits, dtype=np.float64)
    out = []
    for t, (norm, spans, pieces), (_, offsets), lg, sc in zip(texts, found, encoded, logits, scores):
        z = float(lg[1] - lg[0])
        c = unit_contributions(len(norm), pieces, offsets, np.asarray(sc, dtype=np.float64))
        p = float(_sigmoid(z))
        out.append(Attribution(t, p, spans, p - _sigmoid(z - c), 1, "decomposition", c, z))
    return out


def top_spans(att: Attribution, top: int = TOP) -> list[dict]:
    """Up to `top` spans that raised p(spam) (effect > 0) and `top` that lowered it (< 0), sorted by
    |effect|, largest first: [{"start", "end", "text", "effect"}]."""
    order = np.argsort(-att.effects, kind="stable")
    up = [i for i in order if att.effects[i] > 0][:top]
    down = [i for i in order[::-1] if att.effects[i] < 0][:top]
    chosen = sorted(up + down, key=lambda i: (-abs(att.effects[i]), att.spans[i][0]))
    return [{"start": int(att.spans[i][0]), "end": int(att.spans[i][1]),
             "text": att.text[att.spans[i][0]:att.spans[i][1]], "effect": float(att.effects[i])}
            for i in chosen]


def explanation(att: Attribution, top: int = TOP) -> dict:
    """The API's `explanation` of an attribution: {"spans": top_spans, "method"}."""
    return {"spans": top_spans(att, top), "method": att.method}


def explain(text: str, score: Scorer, max_rows: int = MAX_ROWS, top: int = TOP, mask_digits: bool = True) -> dict:
    """{"spans": [...], "method": "occlusion"} for one text (the API's `explanation`): see `top_spans`."""
    return explanation(attribute(text, score, max_rows, mask_digits), top)


def explain_many(texts: Sequence[str], score: Scorer, max_rows: int = MAX_ROWS, top: int = TOP,
                 mask_digits: bool = True) -> list[dict]:
    """`explain` (occlusion) for each text: one scorer call per text."""
    return [explain(t, score, max_rows, top, mask_digits) for t in texts]


# ------------------------------------------------------------------------------------------ scorers


def onnx_scorer(classifier) -> Scorer:
    """p(spam) of raw texts through a serving.inference.Classifier, all of them in one graph call (the
    classifier's own `predict_proba` would cut them into sub-batches of its batch size)."""
    from serving.inference import spam_probability

    def score(texts: list[str]) -> np.ndarray:
        prepared = classifier.encode(texts)
        return spam_probability(classifier.run_encoded(*classifier.pad(prepared)))

    return score


def onnx_token_scorer(classifier) -> TokenScorer:
    """(logits, token scores) of encoded rows through a Classifier whose bundle has token_scores: one
    session.run per `classifier.batch_size` rows (the server's explained requests fit in one)."""
    return classifier.decompose


def explainer_for(predict: Callable[[list[str]], list[dict]]) -> tuple[str, Callable[[Sequence[str], int], list[dict]]]:
    """(method, explain(texts, max_rows) -> [explanation]) for a model the server serves: decomposition in
    one graph call for the request's texts when `predict` is a Classifier's method whose graph has
    token_scores, else occlusion (one call per text, at most max_rows + 1 rows each)."""
    from serving.inference import Classifier

    owner = getattr(predict, "__self__", None)
    if isinstance(owner, Classifier) and owner.has_token_scores:
        mask = bool(owner.bundle.text.mask_digits)
        return "decomposition", lambda texts, max_rows: [
            explanation(a) for a in decompose_many(texts, owner.encoder, owner.decompose, mask)]
    score = scorer_for(predict)
    mask = bool(owner.bundle.text.mask_digits) if isinstance(owner, Classifier) else True
    return "occlusion", lambda texts, max_rows: explain_many(texts, score, max_rows, mask_digits=mask)


def scorer_for(predict: Callable[[list[str]], list[dict]]) -> Scorer:
    """The server's scorer for a model it serves as `predict(texts) -> [{"spam_probability", ...}]`: one
    graph call when `predict` is a Classifier's method (what the server loads), else `predict` itself."""
    from serving.inference import Classifier

    owner = getattr(predict, "__self__", None)
    if isinstance(owner, Classifier):
        return onnx_scorer(owner)
    return lambda texts: np.asarray([r["spam_probability"] for r in predict(list(texts))], dtype=np.float64)
