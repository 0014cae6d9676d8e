"""The parity gates of `make export` and the table it prints: fp32 ONNX against PyTorch (logits and labels), and
int8 against fp32 (label agreement and spam-F1 drop, overall and per language, at the thresholds served)."""

from __future__ import annotations

import math

from serving.inference import spam_probability
from serving.thresholds import describe
from training.metrics import choice_text, fmt

# A language with fewer validation rows than this is reported but not gated on int8 F1: one flipped row
# among 10 spam messages moves F1 by ~0.05, far beyond any sensible drop limit, and says nothing.
MIN_LANG_ROWS = 30
# ... and a gated language with this many labels changed or fewer passes whatever its F1 drop: one of the 15
# mixed-language validation spam of the default mix is 0.032 of F1, so every recipe failed on one message.
LANG_CHANGES_TOLERATED = 1


def fp32_parity(ref_logits, onnx_logits, threshold, limit: float) -> dict:
    """`threshold`: a float or per-row thresholds (the policy applied to the rows' languages)."""
    import numpy as np

    diff = np.abs(np.asarray(ref_logits) - np.asarray(onnx_logits))
    ref_lab = spam_probability(ref_logits) >= threshold
    onnx_lab = spam_probability(onnx_logits) >= threshold
    mismatches = int(np.sum(ref_lab != onnx_lab))
    max_diff = float(diff.max()) if diff.size else 0.0
    return {
        "rows": int(len(diff)),
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": float(diff.mean()) if diff.size else 0.0,
        "max_abs_prob_diff": float(np.abs(spam_probability(ref_logits) - spam_probability(onnx_logits)).max())
        if diff.size else 0.0,
        "label_mismatches": mismatches,
        "limit": limit,
        "passed": bool(max_diff <= limit and mismatches == 0),
    }


def int8_parity(labels, langs, p_fp32, p_int8, threshold, min_agreement: float, max_f1_drop: float) -> dict:
    """Label agreement with fp32 and spam-F1 drop (vs the true labels) overall and per language.
    `threshold`: a float or per-row thresholds (each row at its language's threshold, as served)."""
    import numpy as np

    from training.metrics import binary_metrics

    y = np.asarray(labels, dtype=np.int64)
    langs = np.asarray(langs, dtype=object)
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(y),))
    agree = float(np.mean((p_fp32 >= threshold) == (p_int8 >= threshold))) if len(y) else 1.0
    scopes = {"overall": np.ones(len(y), dtype=bool)}
    for lang in sorted(set(langs.tolist())):
        scopes[f"lang={lang}"] = langs == lang
    table = {}
    reasons = []
    if agree < min_agreement:
        reasons.append(f"label agreement {agree:.4f} < {min_agreement}")
    for scope, m in scopes.items():
        f_fp = binary_metrics(y[m], p_fp32[m], threshold[m])["f1"]
        f_q = binary_metrics(y[m], p_int8[m], threshold[m])["f1"]
        rows = int(m.sum())
        changed = int(np.sum((p_fp32[m] >= threshold[m]) != (p_int8[m] >= threshold[m])))
        a = 1.0 - changed / rows if rows else 1.0
        drop = (f_fp - f_q) if not (math.isnan(f_fp) or math.isnan(f_q)) else (
            0.0 if math.isnan(f_fp) and math.isnan(f_q) else math.nan)
        gated = scope == "overall" or rows >= MIN_LANG_ROWS
        ok = ((not gated) or (not math.isnan(drop) and drop <= max_f1_drop + 1e-12)
              or (scope != "overall" and changed <= LANG_CHANGES_TOLERATED))
        if not ok:
            reasons.append(f"{scope}: F1 drop {drop:.4f} > {max_f1_drop}" if not math.isnan(drop)
                           else f"{scope}: F1 undefined for one variant")
        table[scope] = {"rows": rows, "changed": changed, "agreement": a, "f1_fp32": f_fp,
                        "f1_int8": f_q, "f1_drop": drop, "gated": gated, "passed": ok}
    return {"label_agreement": agree, "min_agreement": min_agreement, "max_f1_drop": max_f1_drop,
            "min_lang_rows": MIN_LANG_ROWS, "lang_changes_tolerated": LANG_CHANGES_TOLERATED, "scopes": table,
            "passed": not reasons, "reason": "; ".join(reasons)}


def parity_table(manifest: dict) -> str:
    """The terminal summary: graph, fp32 parity, int8 attempts, per-language int8 figures, file sizes."""
    p, g, q = manifest["parity"], manifest.get("graph", {}), manifest["int8"]
    f = p["fp32"]
    lines = [
        f"graph: {g.get('exporter')} exporter, opset {g.get('opset')}, "
        + ("fused " + ", ".join(f"{k}x{v}" for k, v in g.get("optimization", {}).get("fused", {}).items())
           if g.get("optimization", {}).get("applied") else "not fused (" + str(g.get("optimization", {}).get("reason")) + ")"),
        f"parity rows: {p['rows']} ({p['data']})",
        "",
        "| check | value | limit | result |",
        "|---|---:|---:|---|",
        f"| fp32 vs PyTorch max abs logit diff | {fmt(f['max_abs_logit_diff'], '.2e')} | {f['limit']:.0e} | "
        f"{'pass' if f['passed'] else 'FAIL'} |",
        f"| fp32 vs PyTorch label mismatches | {f['label_mismatches']} | 0 | {'pass' if f['label_mismatches'] == 0 else 'FAIL'} |",
    ]
    for variant, t in (p.get("token_scores") or {}).items():
        if t:
            lines.append(f"| {variant} sum(token_scores) + bias vs logit diff | {fmt(t['max_abs_sum_error'], '.2e')} | "
                         f"{t['limit']:.0e} | {'pass' if t['passed'] else 'FAIL'} |")
    for a in q.get("attempts", []):
        val = fmt(a.get("label_agreement")) + " agree, F1 drop " + fmt(a.get("f1_drop")) if "error" not in a else "error"
        lines.append(f"| int8 {a['name']} | {val} | — | {'pass' if a.get('passed') else 'fail'} |")
    gate = p.get("int8") or {}
    if gate.get("scopes"):
        lines += ["", "| int8 scope | rows | labels changed | agreement | F1 fp32 | F1 int8 | drop | gated |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for scope, s in gate["scopes"].items():
            lines.append(f"| {scope} | {s['rows']} | {s.get('changed', '—')} | {fmt(s['agreement'])} | "
                         f"{fmt(s['f1_fp32'])} | {fmt(s['f1_int8'])} | "
                         f"{fmt(s['f1_drop'])} | {'yes' if s['gated'] else 'no (<' + str(MIN_LANG_ROWS) + ' rows)'} |")
    speed = manifest.get("metrics", {}).get("speed_at_export", {})
    if speed:
        lines += ["", "speed at export (ms per text, parity batches): " + ", ".join(
            f"{k.removesuffix('_ms_per_text')} {v:.2f}" for k, v in speed.items() if k.endswith("_ms_per_text"))]
    for variant, own in (manifest.get("thresholds_by_model") or {}).items():
        extra = choice_text(own.get("global") or {})
        pooled = " and the unread training ham" if (own.get("global") or {}).get("pool") else ""
        lines.append(f"{variant} thresholds, chosen by the model's rule on its own validation scores{pooled}: "
                     f"{describe(own)} (the model's: {describe(manifest['thresholds'])})"
                     + (f"; {extra}" if extra else ""))
    lines += ["files: " + ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in manifest["files"].items())]
    lines.append(f"int8: {q['status']}" + (f" ({q['recipe']['name']})" if q.get("recipe") else f" — {q.get('reason')}"))
    return "\n".join(lines)
