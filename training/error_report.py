"""The HTML error report of `make eval`: false positives and false negatives at the shipped thresholds, per
language and source, each message with the spans that raised (red) and lowered (green) its spam probability.

    write_report(path, texts, labels, p_spam, thresholds, langs, sources, score, title=...) -> counts

Spans come from serving/explain.py, the same code the server's `"explain": true` runs: training/evaluate.py
passes the PyTorch model's decomposition (`attribute`, mean-pooled models: the token scores of
training/modeling.py, as the server's bundle computes them) or its scorer for occlusion (cls-pooled ones). One self-contained file (inline CSS, no script, nothing
loaded from elsewhere), so MLflow's artifact view shows it as it is. Messages are untrusted input: every
piece of text in the page goes through html.escape.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from serving.explain import MAX_ROWS, Attribution, attribute, top_spans

CAP_PER_GROUP = 20  # messages shown per (kind, language, source) group
SHOWN_CHARS = 3000  # characters of a message shown (with its spans inside them)

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.msg { border: 1px solid #ddd; border-radius: 4px; padding: .5em .8em; margin: .6em 0; }
.meta { color: #555; font-size: 12px; margin-bottom: .3em; }
.text { white-space: pre-wrap; word-break: break-word; max-height: 18em; overflow: auto; }
mark { border-radius: 2px; padding: 0 1px; color: inherit; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
"""


def highlight(text: str, spans: Sequence[dict], limit: int = SHOWN_CHARS) -> str:
    """`text` as escaped HTML with each span in a <mark>: red for effect > 0 (raised p(spam)), green for
    < 0, opacity by |effect| relative to the message's largest; spans are disjoint [start, end) offsets."""
    shown = text[:limit]
    scale = max([abs(s["effect"]) for s in spans] + [0.05])
    out, pos = [], 0
    for s in sorted(spans, key=lambda s: s["start"]):
        a, b = s["start"], min(s["end"], len(shown))
        if a >= b or a < pos:
            continue
        alpha = 0.15 + 0.7 * abs(s["effect"]) / scale
        rgb = "220,40,40" if s["effect"] > 0 else "40,170,70"
        out.append(html.escape(shown[pos:a]))
        out.append(f'<mark style="background: rgba({rgb},{alpha:.2f})" title="effect {s["effect"]:+.3g}">'
                   f"{html.escape(shown[a:b])}</mark>")
        pos = b
    out.append(html.escape(shown[pos:]))
    if len(text) > limit:
        out.append(f'<span class="meta"> … ({len(text) - limit:,} more characters)</span>')
    return "".join(out)


def write_report(path: str | Path, texts: Sequence[str], labels: Sequence[int], p_spam: Sequence[float],
                 thresholds: Sequence[float], langs: Sequence[str], sources: Sequence[str],
                 score: Callable[[list[str]], np.ndarray], *, title: str = "Errors", cap: int = CAP_PER_GROUP,
                 max_rows: int = MAX_ROWS, mask_digits: bool = True,
                 explain: Callable[[str], Attribution] | None = None) -> dict:
    """Write the report; returns {"false_positives", "false_negatives", "explained", "method"} (counts of all
    errors, and of those shown with spans). A row is spam iff p_spam >= its threshold (its language's one).
    `explain(text) -> Attribution`: the attribution to show (decomposition); None: occlusion with `score`."""
    explain = explain or (lambda t: attribute(t, score, max_rows, mask_digits))
    labels, p, th = np.asarray(labels, dtype=int), np.asarray(p_spam, dtype=np.float64), np.asarray(thresholds)
    predicted = (p >= th).astype(int)
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i in np.flatnonzero(predicted != labels):
        kind = "fp" if predicted[i] == 1 else "fn"
        groups[(kind, str(langs[i]), str(sources[i]))].append(int(i))
    counts = {"false_positives": int(((predicted == 1) & (labels == 0)).sum()),
              "false_negatives": int(((predicted == 0) & (labels == 1)).sum()), "explained": 0, "method": None}
    e = html.escape
    body = [f"<h1>{e(title)}</h1>",
            f"<p>{len(labels):,} messages; {counts['false_positives']:,} false positives (ham flagged as spam) and "
            f"{counts['false_negatives']:,} false negatives (spam let through) at the shipped thresholds. At most "
            f"{cap} per language and source, the most confident mistakes first. Highlighted: the spans that "
            f"<mark style='background: rgba(220,40,40,.6)'>raised</mark> and "
            f"<mark style='background: rgba(40,170,70,.6)'>lowered</mark> the spam probability most (hover for "
            f"the effect: by decomposition, p(spam) minus p(spam) without the span's share of the logit; by "
            f"occlusion, the change of p(spam) when the span is removed).</p>",
            "<table><tr><th>group</th><th>false positives</th><th>false negatives</th></tr>"]
    keys = sorted({(lang, src) for _, lang, src in groups})
    for lang, src in keys:
        body.append(f"<tr><td>{e(lang)} · {e(src)}</td><td>{len(groups.get(('fp', lang, src), []))}</td>"
                    f"<td>{len(groups.get(('fn', lang, src), []))}</td></tr>")
    body.append("</table>")
    for kind, heading in (("fp", "False positives: ham flagged as spam"), ("fn", "False negatives: spam let through")):
        body.append(f"<h2>{heading}</h2>")
        kind_keys = [k for k in sorted(groups) if k[0] == kind]
        if not kind_keys:
            body.append("<p>None.</p>")
        for key in kind_keys:
            rows = sorted(groups[key], key=lambda i: -p[i] if kind == "fp" else p[i])
            body.append(f"<h3>{e(key[1])} · {e(key[2])} ({min(cap, len(rows))} of {len(rows)})</h3>")
            for i in rows[:cap]:
                att = explain(texts[i])
                spans = top_spans(att)
                counts["explained"] += 1
                counts["method"] = att.method
                body.append(f'<div class="msg"><div class="meta">p(spam) {p[i]:.4f} · threshold {float(th[i]):.4f} · '
                            f"label {'spam' if labels[i] else 'ham'}</div>"
                            f'<div class="text">{highlight(texts[i], spans)}</div></div>')
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return counts
