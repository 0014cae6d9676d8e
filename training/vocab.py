"""Vocabulary trimming (`model.trim_vocab`): keep the pieces the corpora use plus the best-scored pieces of each
served script, rebuild the tokenizer and the embedding matrix on them, and report per language how much text
outside the corpora the trimmed tokenizer segments differently from the untrimmed one.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from training.backbone import BackboneError, count_parameters
from training.config import ModelConfig


def backend_tokenizer(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def unk_rate(tokenizer, texts: list[str]) -> float:
    """Share of the content tokens of `texts` that are <unk> (a PreTrainedTokenizerFast or a tokenizers.Tokenizer)."""
    backend = backend_tokenizer(tokenizer)
    unk = backend.token_to_id("<unk>")
    total = hits = 0
    for enc in backend.encode_batch(list(texts), add_special_tokens=False):
        total += len(enc.ids)
        hits += sum(1 for i in enc.ids if i == unk)
    return hits / total if total else 0.0


def _used_ids(backend, texts: list[str], chunk: int = 2000) -> set[int]:
    from tqdm import tqdm

    used: set[int] = set()
    starts = range(0, len(texts), chunk)
    # a progress bar only where it is worth one (tens of MB of e-mail take about half a minute)
    for start in tqdm(starts, desc="vocabulary: tokenising the corpora", unit="chunk", disable=len(starts) < 4):
        for enc in backend.encode_batch(list(texts[start:start + chunk]), add_special_tokens=False):
            used.update(enc.ids)
    return used


def _base_ids(spec: dict) -> set[int]:
    """The pieces kept whatever the corpora say:
    - special tokens;
    - every single-character piece, with and without '▁' (about 15k of 250k): every character the
      vocabulary knows keeps a piece, so unseen text never turns into more <unk> than before, whatever
      its script (CJK ideographs, kana, Hangul, Latin, digits, punctuation, but also the Bopomofo of
      Taiwanese SMS and the mojibake of old e-mails);
    - '▁' itself;
    - the lowest-scoring pieces: Unigram's <unk> score is (min score - 10), so keeping them keeps that
      penalty, and with it the segmentation of text with unknown characters, unchanged."""
    vocab = spec["model"]["vocab"]
    keep = {t["id"] for t in spec["added_tokens"]}
    low = min(score for _, score in vocab)
    for i, (piece, score) in enumerate(vocab):
        bare = piece[1:] if piece.startswith("\u2581") else piece
        if len(bare) <= 1 or score == low:
            keep.add(i)
    return keep


# The served scripts whose multi-character pieces trimming can keep beyond what the corpora use, each
# with its `model.trim_keep_<script>` budget.
SCRIPTS = ("han", "kana", "hangul", "latin", "symbols")
REFERENCE_FILE = Path(__file__).parent / "assets" / "trim_reference.jsonl"
REPORT_LANGS = ("zh", "ja", "ko", "en")
_HAN_MARKS = frozenset("\u3005\u3006\u3007")  # 々 〆 〇: written with ideographs ("人々"), not letters


def piece_script(piece: str) -> str | None:
    """The served script a multi-character piece is made of ('▁' aside), else None:
    han (ideographs only), kana (hiragana/katakana, with or without ideographs: "ください", "受け取"),
    hangul, latin (letters only: "▁free", "xxx" of masked digits), symbols (punctuation and symbols only:
    "!!", "://", "。」"). None for single characters (always kept, `_base_ids`), for pieces mixing scripts
    or letters with punctuation, for other scripts, and for any piece with a digit: `serving.text.normalize`
    masks every digit as "x" (mask_digits), so "▁2023年" is never produced in training or serving."""
    from serving.text import _script

    bare = piece[1:] if piece.startswith("\u2581") else piece
    if len(bare) <= 1 or any(ch.isdigit() for ch in bare):
        return None
    scripts = {"han" if ch in _HAN_MARKS else _script(ch) for ch in bare}
    if scripts == {"han"}:
        return "han"
    if "kana" in scripts and scripts <= {"kana", "han"}:
        return "kana"
    if len(scripts) == 1 and scripts <= {"hangul", "latin"}:
        return scripts.pop()
    if scripts == {None} and all(unicodedata.category(ch)[0] in "PS" for ch in bare):
        return "symbols"
    return None


_SCRIPTS_CACHE: dict[tuple, list] = {}


def _piece_scripts(spec: dict) -> list[str | None]:
    """`piece_script` of every piece of the vocabulary, computed once per vocabulary (about a second for
    XLM-R's 250k pieces; the tests trim it many times)."""
    pieces = tuple(piece for piece, _ in spec["model"]["vocab"])
    key = (len(pieces), hash(pieces))
    if key not in _SCRIPTS_CACHE:
        _SCRIPTS_CACHE.clear()
        _SCRIPTS_CACHE[key] = [piece_script(p) for p in pieces]
    return _SCRIPTS_CACHE[key]


def script_budgets(model_cfg: ModelConfig) -> dict[str, int]:
    """{script: budget} from `model.trim_keep_<script>` (-1 = all, 0 = none)."""
    budgets = {s: getattr(model_cfg, f"trim_keep_{s}") for s in SCRIPTS}
    for script, n in budgets.items():
        if n < -1:
            raise BackboneError(f"model.trim_keep_{script} must be -1 (all), 0 (none) or a number of pieces, "
                                f"got {n}")
    return budgets


def _script_ids(spec: dict, budgets: dict[str, int]) -> tuple[set[int], dict[str, int]]:
    """The `budgets[script]` best-scored multi-character pieces of each served script (whatever the corpora
    use), and how many pieces each script has.

    Why this keeps segmentations: Unigram picks, per pre-token, the segmentation with the highest sum of
    piece scores (Viterbi), and `_rebuild` keeps every kept piece's score. Removing pieces only removes
    candidate segmentations, so a text's segmentation is unchanged exactly when every piece of its
    untrimmed segmentation is kept; dropping any multi-character piece changes the texts whose best path
    used it, and only those. What a kept piece's own sub-pieces are does not matter: a text whose best
    path uses the kept piece keeps it, and where the sub-pieces themselves were the best path they are
    needed, kept piece or not. So what to keep is the pieces most often *chosen*, and that is what the
    score says: it is the piece's log-probability as a token in XLM-R's own (EM-estimated) segmentation of
    its 100-language training text, not a substring frequency (a piece always covered by a longer one
    scores low). Keeping the top-N by score per script therefore keeps the most segmentation for N pieces,
    and keeping all of a script keeps every text of that script exactly (up to the few pieces that mix
    scripts, punctuation or digits). Per script, because the scores follow XLM-R's language mix, not ours."""
    vocab = spec["model"]["vocab"]
    ranked: dict[str, list[tuple[float, int]]] = {s: [] for s in SCRIPTS}
    for i, script in enumerate(_piece_scripts(spec)):
        if script is not None:
            ranked[script].append((-vocab[i][1], i))
    keep: set[int] = set()
    for script, pieces in ranked.items():
        n = budgets.get(script, 0)
        if n:
            pieces.sort()
            keep.update(i for _, i in (pieces if n < 0 else pieces[:n]))
    return keep, {s: len(p) for s, p in ranked.items()}


def _case_variant_ids(spec: dict, keep: set[int], index: dict[str, int] | None = None) -> set[int]:
    """The lower, Capitalised and UPPER forms of every kept Latin piece that the vocabulary has and `keep`
    lacks: an English corpus gives "▁heavy", but a message may start with "▁Heavy" or shout "▁FREE", and
    XLM-R's scores rank such forms far down (▁Heavy: 92,641st of its 108,120 Latin pieces)."""
    vocab = spec["model"]["vocab"]
    scripts = _piece_scripts(spec)
    if index is None:
        index = {piece: i for i, (piece, _) in enumerate(vocab)}
    out: set[int] = set()
    for i in keep:
        if scripts[i] != "latin":
            continue
        piece = vocab[i][0]
        prefix = "\u2581" if piece.startswith("\u2581") else ""
        bare = piece[len(prefix):]
        for form in (bare.lower(), bare.capitalize(), bare.upper()):
            j = index.get(prefix + form)
            if j is not None and j not in keep:
                out.add(j)
    return out


def _script_counts(spec: dict, ids) -> dict[str, int]:
    """Pieces per script among `ids`; "other": single characters, special tokens, pieces of no served script."""
    scripts = _piece_scripts(spec)
    counts = dict.fromkeys((*SCRIPTS, "other"), 0)
    for i in ids:
        counts[scripts[i] or "other"] += 1
    return counts


def read_reference_texts(path: str | Path) -> list[str]:
    """The `text` field of a JSONL file, or the `text` column of a CSV/TSV file (optionally .gz), for the
    resegmentation report (`model.trim_report_files`)."""
    import csv
    import gzip
    import json

    from training.config import resolve_path

    p = resolve_path(path)
    if not p.is_file():
        raise BackboneError(f"model.trim_report_files: {path} does not exist ({p})")
    name = p.name.lower().removesuffix(".gz")
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    texts: list[str] = []
    with opener(p, "rt", encoding="utf-8", newline="") as f:
        if name.endswith((".jsonl", ".json")):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BackboneError(f"{path}:{n}: not a JSON line ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise BackboneError(f"{path}:{n}: expected an object with a string 'text' field")
                texts.append(row["text"])
        elif name.endswith((".csv", ".tsv")):
            reader = csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ",")
            if "text" not in (reader.fieldnames or []):
                raise BackboneError(f"{path}: no 'text' column (columns: {', '.join(reader.fieldnames or [])})")
            texts.extend(row["text"] or "" for row in reader)
        else:
            raise BackboneError(f"model.trim_report_files: {path} is not a .jsonl, .csv or .tsv file")
    return texts


def resegmentation_by_language(before, after, texts: list[str]) -> dict[str, dict]:
    """Per language tag (zh/ja/ko/en always, mixed/other when present): how many messages there are, how
    many `after` segments differently from `before`, and that share. Each text is prepared as the pipeline
    does (`normalize(..., mask_digits=True)`, `language_tag`) and compared whole, as piece strings."""
    from serving.text import language_tag, normalize

    prepared = [t for t in (normalize(t, mask_digits=True) for t in texts) if t]
    out = {lang: {"messages": 0, "resegmented": 0, "resegmented_share": None} for lang in REPORT_LANGS}
    if prepared:
        a = backend_tokenizer(before).encode_batch(prepared, add_special_tokens=False)
        b = backend_tokenizer(after).encode_batch(prepared, add_special_tokens=False)
        for text, x, y in zip(prepared, a, b):
            row = out.setdefault(language_tag(text), {"messages": 0, "resegmented": 0, "resegmented_share": None})
            row["messages"] += 1
            row["resegmented"] += x.tokens != y.tokens
    for row in out.values():
        if row["messages"]:
            row["resegmented_share"] = row["resegmented"] / row["messages"]
    return out


def _remap_ids(node, old_to_new: dict[int, int], key: str | None = None):
    """Rewrite every integer under an "id"/"ids" key of the post_processor (TemplateProcessing or
    RobertaProcessing: ["</s>", 2]) from the old to the new vocabulary."""
    if isinstance(node, dict):
        return {k: _remap_ids(v, old_to_new, k) for k, v in node.items()}
    if isinstance(node, list):
        if key in ("sep", "cls") and len(node) == 2 and isinstance(node[1], int):
            return [node[0], old_to_new[node[1]]]
        return [_remap_ids(v, old_to_new, key) for v in node]
    if key in ("id", "ids") and isinstance(node, int):
        return old_to_new[node]
    return node


def _rebuild(spec: dict, keep: set[int]) -> tuple[dict, list[int]]:
    """A tokenizer.json over the kept pieces: the original order and scores (so Viterbi picks the same
    pieces wherever they are all kept), with added tokens and post_processor ids remapped."""
    old_vocab = spec["model"]["vocab"]
    kept = sorted(keep)
    old_to_new = {old: new for new, old in enumerate(kept)}
    out = dict(spec)
    out["model"] = dict(spec["model"], vocab=[old_vocab[i] for i in kept])
    if spec["model"].get("unk_id") is not None:
        out["model"]["unk_id"] = old_to_new[spec["model"]["unk_id"]]
    out["added_tokens"] = [dict(t, id=old_to_new[t["id"]]) for t in spec["added_tokens"]]
    if spec.get("post_processor"):
        out["post_processor"] = _remap_ids(spec["post_processor"], old_to_new)
    return out, kept


def _tokenizer_from_spec(spec: dict, like):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    cls = type(like) if isinstance(like, PreTrainedTokenizerFast) else PreTrainedTokenizerFast
    special = {k: str(v) for k, v in getattr(like, "special_tokens_map", {}).items() if isinstance(v, str)}
    tokenizer = cls(tokenizer_object=backend, model_max_length=getattr(like, "model_max_length", 512), **special)
    if tokenizer.backend_tokenizer.get_vocab_size() != len(spec["model"]["vocab"]):
        raise BackboneError(f"{cls.__name__} did not keep the trimmed vocabulary")
    return tokenizer


def trim_vocabulary(model, tokenizer, texts: list[str], holdout_every: int = 20,
                    model_cfg: ModelConfig | None = None):
    """Keep the pieces `texts` use, the always-kept set (`_base_ids`), the best-scored pieces of each served
    script (`_script_ids`, budgets `model_cfg.trim_keep_<script>`) and the case variants of the kept Latin
    pieces (`model_cfg.trim_keep_case_variants`), rebuild the tokenizer over them and slice the
    word-embedding matrix to match. Returns (model, tokenizer, report). `model_cfg` None: the defaults.

    The report's <unk> rate and segmentation change are measured honestly on held-out texts (every
    `holdout_every`-th text, left out of the piece count for that measurement); the returned tokenizer then
    also keeps the held-out texts' pieces, so every given text keeps its original segmentation. Reference
    text that never chose a piece (the shipped `assets/trim_reference.jsonl`, `model_cfg.trim_report_files`)
    gives, per language, the share of messages segmented differently from the untrimmed tokenizer; the size
    cost is in `pieces_kept_per_script`, `embedding_parameters` and `int8_mb_estimate` (every weight at one
    byte, as export's per_channel recipe; recipes that keep some matrices in fp32 add to it)."""
    import json

    import torch

    from tokenizers import Tokenizer

    model_cfg = model_cfg if model_cfg is not None else ModelConfig()
    budgets = script_budgets(model_cfg)
    report_files = [read_reference_texts(p) for p in model_cfg.trim_report_files]  # fail early when missing
    spec = json.loads(backend_tokenizer(tokenizer).to_str())
    if spec["model"]["type"] != "Unigram":
        raise BackboneError("vocabulary trimming supports Unigram (sentencepiece) tokenizers only; "
                            "set model.trim_vocab=false for this backbone")
    texts = [t for t in texts if t]
    heldout = texts[holdout_every - 1 :: holdout_every]
    fitted = [t for i, t in enumerate(texts) if (i + 1) % holdout_every]
    backend = backend_tokenizer(tokenizer)
    base = _base_ids(spec)
    script_ids, script_sizes = _script_ids(spec, budgets)
    fitted_ids = _used_ids(backend, fitted)
    heldout_ids = _used_ids(backend, heldout)
    index = ({piece: i for i, (piece, _) in enumerate(spec["model"]["vocab"])}
             if model_cfg.trim_keep_case_variants else {})

    def with_case_variants(ids: set[int]) -> set[int]:
        return ids | _case_variant_ids(spec, ids, index) if model_cfg.trim_keep_case_variants else ids

    # the held-out measurement: a vocabulary built without the held-out texts
    probe_spec, _ = _rebuild(spec, with_case_variants(base | script_ids | fitted_ids))
    probe = Tokenizer.from_str(json.dumps(probe_spec, ensure_ascii=False))

    from_texts = base | fitted_ids | heldout_ids
    final_spec, kept = _rebuild(spec, with_case_variants(from_texts | script_ids))
    new_tokenizer = _tokenizer_from_spec(final_spec, tokenizer)

    emb = model.get_input_embeddings()
    rows_before = emb.weight.shape[0]
    if kept[-1] >= rows_before:
        raise BackboneError(f"tokenizer piece {kept[-1]} has no embedding row (only {rows_before})")
    params_before = count_parameters(model)
    old_to_new = {old: new for new, old in enumerate(kept)}
    new_pad = old_to_new.get(getattr(model.config, "pad_token_id", None))
    new_emb = torch.nn.Embedding(len(kept), emb.weight.shape[1], padding_idx=new_pad)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight[torch.tensor(kept, dtype=torch.long)])
    new_emb.weight.requires_grad_(emb.weight.requires_grad)
    model.set_input_embeddings(new_emb)
    model.config.vocab_size = len(kept)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        old = getattr(model.config, key, None)
        if isinstance(old, int):
            setattr(model.config, key, old_to_new.get(old))
    embeddings = getattr(model.base_model, "embeddings", None)
    if isinstance(getattr(embeddings, "padding_idx", None), int):  # RoBERTa derives position ids from it
        embeddings.padding_idx = new_pad

    report = {
        "pieces_before": len(spec["model"]["vocab"]),
        "pieces_kept": len(kept),
        "pieces_used_by_texts": len(fitted_ids | heldout_ids),
        "embedding_rows_before": rows_before,
        "embedding_rows_after": len(kept),
        "parameters_before": params_before,
        "parameters_after": count_parameters(model),
        "texts": len(texts),
        "heldout_texts": len(heldout),
        "heldout_unk_rate_before": unk_rate(tokenizer, heldout),
        "heldout_unk_rate_after": unk_rate(probe, heldout),
        "heldout_resegmented_share": _changed_share(tokenizer, probe, heldout),
        # per language, on text that no piece was chosen for
        "reference_resegmented": resegmentation_by_language(tokenizer, new_tokenizer,
                                                            read_reference_texts(REFERENCE_FILE)),
        "report_files_resegmented": {
            path: resegmentation_by_language(tokenizer, new_tokenizer, report_texts)
            for path, report_texts in zip(model_cfg.trim_report_files, report_files)
        },
        # the size cost
        "keep_per_script": budgets,
        "keep_case_variants": model_cfg.trim_keep_case_variants,
        "pieces_per_script_before": script_sizes,
        "pieces_kept_per_script": _script_counts(spec, kept),
        "pieces_added_by_scripts": len(script_ids - from_texts),
        "pieces_added_as_case_variants": len(set(kept) - from_texts - script_ids),
        "embedding_parameters": new_emb.weight.numel(),
        "embedding_int8_mb": new_emb.weight.numel() / 1e6,
        "int8_mb_estimate": count_parameters(model) / 1e6,
    }
    return model, new_tokenizer, report


def _changed_share(before, after, texts: list[str]) -> float:
    """Share of texts whose pieces differ between two tokenizers (compared as strings, not ids)."""
    if not texts:
        return 0.0
    a = backend_tokenizer(before).encode_batch(list(texts), add_special_tokens=False)
    b = backend_tokenizer(after).encode_batch(list(texts), add_special_tokens=False)
    return sum(x.tokens != y.tokens for x, y in zip(a, b)) / len(texts)
