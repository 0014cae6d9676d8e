"""Figure explain: are the explanations faithful, and what do they cost? (serving/explain.py)

The method measured is the one the server uses for the bundle: decomposition when its graph has
token_scores (a mean-pooled model), else occlusion; with decomposition, occlusion is measured beside it.

- Deletion test, per language and method: spam messages (en and zh from the test split, ja and ko from
  data/ood/cjk_scam_eval.jsonl, whose spam the test split has little of) that the model reads whole (not
  truncated) and that have at least 4 spans. For each, the 3 spans with the largest effect are removed
  together, and, against them, 3 random spans of the same sizes in characters (non-overlapping, anywhere
  in the text, seeded; several draws averaged). Reported: the mean drop of p(spam) for each and their ratio
  (target >= 2). Every variant of a message is scored in one call with its full text, so int8's
  batch-dependent activation scale cannot pass for an effect.
- Cost: explaining an SMS-length test text against classifying it, both at batch 1 (one text per call,
  normalisation and tokenisation included) on the bundle's int8 graph, interleaved rounds, medians
  (target <= 4x): the served method's explanation alone (occlusion at --explain-max-rows 32, 8 and 4, and
  decomposition), and the server's explained request (its classification, then its explanation).
"""

from __future__ import annotations

import json
import random

import numpy as np

from bench.inputs import Inputs, load_split, sample_rows
from bench.timing import interleaved, percentiles
from training.config import resolve_path
from training.metrics import fmt

TITLE = "Explanations: deletion test and cost"
NEEDS = ("model", "bundle", "data")
LANGS = (("en", "test"), ("zh", "test"), ("ja", "cjk_scam_eval"), ("ko", "cjk_scam_eval"))
EVAL_SET = "data/ood/cjk_scam_eval.jsonl"
TOP_K = 3
CAPS = (32, 8, 4)  # --explain-max-rows values timed; the first is serving/explain.py's default


def _settings(quick: bool) -> dict:
    if quick:
        return {"texts_per_lang": 6, "draws": 2, "cost_texts": 6, "rounds": 1, "seconds_per_round": 0.2}
    # ~100 texts x 4 languages x (33 + 6) rows, and 3 rounds of 3 s per engine: about 3 minutes for e5-small.
    return {"texts_per_lang": 100, "draws": 5, "cost_texts": 64, "rounds": 3, "seconds_per_round": 3.0}


def _spam_texts(inputs: Inputs, lang: str, where: str) -> list[str]:
    if where == "test":
        test = load_split(inputs, "test")
        return [t for t, y, lg in zip(test["text"], test["label"], test["lang"]) if y == 1 and lg == lang]
    rows = [json.loads(line) for line in resolve_path(EVAL_SET).read_text(encoding="utf-8").splitlines() if line]
    return [r["text"] for r in rows if r.get("label") == "spam" and r.get("lang") == lang]


def random_spans(n_chars: int, sizes: list[int], rng: random.Random, tries: int = 200) -> list[tuple[int, int]] | None:
    """Non-overlapping spans of the given sizes at uniformly random positions in [0, n_chars), or None."""
    for _ in range(tries):
        out: list[tuple[int, int]] = []
        for size in sizes:
            if size > n_chars:
                return None
            a = rng.randrange(0, n_chars - size + 1)
            if any(a < e and s < a + size for s, e in out):
                break
            out.append((a, a + size))
        else:
            return out
    return None


def deletion_test(texts: list[str], score, clf, settings: dict, seed: int, attribute) -> dict:
    """`attribute(text) -> Attribution` (the method under test); `score`: p(spam) of true deletions."""
    from serving.explain import remove

    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    drops_top, drops_rand, p_full, spans_n, skipped = [], [], [], [], {"truncated": 0, "few_spans": 0, "no_draw": 0}
    for i in order:
        if len(drops_top) >= settings["texts_per_lang"]:
            break
        t = texts[i]
        if clf.encode([t])[0].truncated:  # random spans beyond what the model reads would flatter the ratio
            skipped["truncated"] += 1
            continue
        att = attribute(t)
        if len(att.spans) <= TOP_K:
            skipped["few_spans"] += 1
            continue
        top = [att.spans[k] for k in np.argsort(-att.effects, kind="stable")[:TOP_K]]
        sizes = [b - a for a, b in top]
        draws = [random_spans(len(t), sizes, rng) for _ in range(settings["draws"])]
        draws = [d for d in draws if d]
        if not draws:
            skipped["no_draw"] += 1
            continue
        p = np.asarray(score([t, remove(t, top)] + [remove(t, d) for d in draws]), dtype=np.float64)
        p_full.append(p[0])
        drops_top.append(p[0] - p[1])
        drops_rand.append(float(np.mean(p[0] - p[2:])))
        spans_n.append(len(att.spans))
    n = len(drops_top)
    top_m = float(np.mean(drops_top)) if n else None
    rand_m = float(np.mean(drops_rand)) if n else None
    return {"texts": n, "candidates": len(texts), "skipped": skipped,
            "mean_p_spam": float(np.mean(p_full)) if n else None,
            "mean_spans": float(np.mean(spans_n)) if n else None,
            "drop_top3": top_m, "drop_random3": rand_m,
            "ratio": (top_m / rand_m) if n and rand_m and rand_m > 0 else None,
            "top_beats_random_share": float(np.mean(np.asarray(drops_top) > np.asarray(drops_rand))) if n else None}


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    from serving.bundle import load_bundle
    from serving.explain import MAX_ROWS, attribute, decompose_many, explain, explainer_for, onnx_scorer
    from serving.inference import Classifier

    assert CAPS[0] == MAX_ROWS
    settings = _settings(quick) | {"seed": seed, "max_rows": MAX_ROWS, "top_k": TOP_K, "threads": threads}
    bundle = load_bundle(inputs.bundle_dir)
    variant = "int8" if bundle.has("int8") else "fp32"
    notes = {} if variant == "int8" else {"variant": "the bundle has no int8 graph: fp32 measured"}
    clf = Classifier(bundle, variant=variant, threads=threads)
    score = onnx_scorer(clf)
    mask = bool(bundle.text.mask_digits)
    method, served_explain = explainer_for(clf.classify)  # what the server runs for this bundle
    methods = {"occlusion": lambda t: attribute(t, score, MAX_ROWS, mask)}
    if method == "decomposition":
        methods = {"decomposition": lambda t: decompose_many([t], clf.encoder, clf.decompose, mask)[0], **methods}
    deletion_by_method: dict[str, dict] = {}
    for name, attribute_fn in methods.items():
        by_lang = deletion_by_method[name] = {}
        for lang, where in LANGS:
            texts = _spam_texts(inputs, lang, where)
            by_lang[lang] = {"source": "test split" if where == "test" else EVAL_SET,
                             **deletion_test(texts, score, clf, settings, seed, attribute_fn)}
    deletion = deletion_by_method[method]

    sms = [r["text"] for r in sample_rows(load_split(inputs, "test"), settings["cost_texts"], seed, channel="sms")]
    if not sms:
        raise ValueError("no SMS rows in the test split to time")
    engines = {"classify": lambda t: clf.classify([t])}
    for cap in CAPS:  # the default cap, and smaller ones: what a lower --explain-max-rows would cost
        engines[f"explain_{cap}"] = lambda t, cap=cap: explain(t, score, cap, mask_digits=mask)
    if method == "decomposition":
        engines["decomposition"] = lambda t: served_explain([t], MAX_ROWS)
    # what an explained request runs on the worker thread: the classification batch, then the explanation
    engines["request"] = lambda t: (clf.classify([t]), served_explain([t], MAX_ROWS))
    times = interleaved(engines, sms, rounds=settings["rounds"], seconds_per_round=settings["seconds_per_round"])
    stats = {name: percentiles(t) for name, t in times.items()}
    base = stats["classify"]["p50_ms"]
    explained = {}
    for cap in CAPS:
        rows = [attribute(t, lambda x: np.zeros(len(x)), cap, mask).rows for t in sms]  # rows only, no model
        explained[str(cap)] = {**stats[f"explain_{cap}"], "mean_rows": float(np.mean(rows)),
                               "ratio_p50": stats[f"explain_{cap}"]["p50_ms"] / base}
    decomposition = ({**stats["decomposition"], "mean_rows": 1.0, "ratio_p50": stats["decomposition"]["p50_ms"] / base}
                     if method == "decomposition" else None)
    served = decomposition if decomposition else explained[str(MAX_ROWS)]
    cost = {"variant": variant, "texts": len(sms), "mean_chars": float(np.mean([len(t) for t in sms])),
            "mean_tokens": float(np.mean([len(p) for p in clf.encode(sms)])), "classify": stats["classify"],
            "explain": explained, "decomposition": decomposition, "max_rows": MAX_ROWS, "method": method,
            "ratio_p50": served["ratio_p50"],
            "request": {**stats["request"], "ratio_p50": stats["request"]["p50_ms"] / base}}
    return {"settings": settings, "variant": variant, "method": method, "deletion": deletion,
            "deletion_by_method": deletion_by_method, "cost": cost, "notes": notes}


def render(result: dict) -> str:
    s, c = result["settings"], result["cost"]
    method = result.get("method", "occlusion")
    by_method = result.get("deletion_by_method") or {method: result["deletion"]}
    lines = [f"Served method: **{method}** (decomposition: the mean-pooled logit split over the tokens of the "
             f"classifying pass; occlusion: words / 2-character CJK chunks removed, at most {s['max_rows']} per "
             f"text). {result['variant']} bundle, threads: {s['threads']}. Deletion test: the top-{s['top_k']} spans "
             f"of each spam message removed together vs {s['top_k']} random spans of the same sizes (mean of "
             f"{s['draws']} draws, seed {s['seed']}); messages the model reads whole, with more than {s['top_k']} "
             f"spans (up to {s['texts_per_lang']} per language). Target: ratio >= 2.", "",
             "| method | lang | source | texts | mean p(spam) | mean spans | drop, top-3 | drop, random 3 | ratio | top > random |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, deletion in by_method.items():
        for lang, d in deletion.items():
            lines.append(f"| {name} | {lang} | {d['source']} | {d['texts']} | {fmt(d['mean_p_spam'], '.3f')} | "
                         f"{fmt(d['mean_spans'], '.1f')} | {fmt(d['drop_top3'])} | {fmt(d['drop_random3'])} | "
                         f"{fmt(d['ratio'], '.2f')} | {fmt(d['top_beats_random_share'], '.0%')} |")
    req = c.get("request")
    lines += ["", f"Cost at batch 1 on {c['texts']} SMS-length test texts ({c['mean_chars']:.0f} characters, "
                  f"{c['mean_tokens']:.0f} tokens on average), normalisation and tokenisation included: classify "
                  f"p50 {c['classify']['p50_ms']:.2f} ms (p90 {c['classify']['p90_ms']:.2f}). Explaining by "
                  f"{method}: **{c['ratio_p50']:.2f}×** (target ≤ 4×)"
                  + (f"; the server's explained request (classification, then explanation): {req['ratio_p50']:.2f}×."
                     if req else "."), "",
              "| method | model rows per text | explain p50 ms | p90 ms | × classify |",
              "|---|---:|---:|---:|---:|"]
    if c.get("decomposition"):
        e = c["decomposition"]
        lines.append(f"| decomposition | 1 | {e['p50_ms']:.2f} | {e['p90_ms']:.2f} | {e['ratio_p50']:.2f} |")
    for cap, e in c["explain"].items():
        lines.append(f"| occlusion, --explain-max-rows {cap} | {e['mean_rows']:.1f} | {e['p50_ms']:.2f} | "
                     f"{e['p90_ms']:.2f} | {e['ratio_p50']:.2f} |")
    for k, v in result.get("notes", {}).items():
        lines += ["", f"- {k}: {v}"]
    return "\n".join(lines)
