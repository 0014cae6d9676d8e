"""Users' reports as a training corpus: `data.corpora.<name>` with `format: feedback` (docs/DESIGN.md §7).

    feedback:
      format: feedback
      path: ""            # SQLAlchemy URL of the server's store; "" = $SPAMLINGO_FEEDBACK_DB or feedback/feedback.db
      channel: other
      enabled: false      # make retrain turns it on

`make data` reads every report of the store (serving.feedback.FeedbackStore.rows), normalises it like every
corpus and hands it to the same de-duplication, near-duplicate grouping and splitting. Before that, the
poisoning guard holds reports back, counted by reason in the manifest and the feedback card, never trained
on silently:
- conflicting_labels: the same normalised text reported as spam by someone and as ham by someone else (or
  by the same reporter, who changed their mind): nobody can tell which is right, so neither is used;
- reporter_cap: one reporter's texts beyond max(max_reporter_share x all reports, min_reporter_rows), oldest
  kept, so that one account cannot steer the model. Reporter names are whatever the client sent (the server
  has no accounts): the cap stops one careless or hostile source, not a forger with many names.
A report that repeats a corpus text with the other label is dropped with it as a label conflict by
training.data.remove_exact_duplicates, like any two corpora that disagree.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from serving.text import language_tag, normalize
from training.config import CorpusConfig, DataConfig

LABELS = {"spam": 1, "ham": 0}
ANONYMOUS = "(anonymous)"  # reports sent without a reporter count as one reporter


class FeedbackDataError(ValueError):
    """The store cannot be read (no store yet, bad URL): one line, raised as training.data.DataError."""


def _open(cc: CorpusConfig, hint: str):
    from serving.feedback import FeedbackError, FeedbackStore, redact

    try:
        return FeedbackStore(cc.path or None, create=False)
    except FeedbackError as e:
        raise FeedbackDataError(f"{hint}: {e} (POST /v1/feedback to the server adds reports; "
                                f"url: {redact(cc.path) if cc.path else 'default'})") from None


def check(name: str, cc: CorpusConfig) -> None:
    hint = f"data.corpora.{name}"
    if not 0 < cc.max_reporter_share <= 1:
        raise FeedbackDataError(f"{hint}.max_reporter_share must be in (0, 1], got {cc.max_reporter_share}")
    if cc.min_reporter_rows < 0:
        raise FeedbackDataError(f"{hint}.min_reporter_rows must be >= 0, got {cc.min_reporter_rows}")


def fingerprint(name: str, cc: CorpusConfig) -> list:
    """What the prepared data depends on in the store (for training.data.data_config_hash): new, removed
    or changed reports change it, so `make data` prepares again."""
    import hashlib

    store = _open(cc, f"data.corpora.{name}")
    try:
        h = hashlib.sha256()
        n = 0
        for r in store.rows():
            h.update(f"{r['id']}\t{r['text_hash']}\t{r['label']}\t{r['reporter']}\n".encode("utf-8"))
            n += 1
    finally:
        store.close()
    return [name, "feedback", n, h.hexdigest()[:16]]


def guard(reports: list[dict], max_share: float, min_rows: int) -> tuple[list[dict], dict[str, list[dict]], int]:
    """(kept reports, {reason: held-back reports}, the per-reporter cap); reports oldest first, each with
    `text_hash`, `label`, `reporter`. One report per (text, label) is kept: the first, whoever else sent it."""
    labels_of: dict[str, set] = defaultdict(set)
    for r in reports:
        labels_of[r["text_hash"]].add(r["label"])
    held: dict[str, list[dict]] = {"conflicting_labels": [], "reporter_cap": []}
    agreed = []
    for r in reports:
        (held["conflicting_labels"] if len(labels_of[r["text_hash"]]) > 1 else agreed).append(r)
    first: dict[str, dict] = {}
    for r in agreed:  # the same text reported by several people: the first report carries it
        first.setdefault(r["text_hash"], r)
    texts = list(first.values())
    cap = max(min_rows, math.floor(max_share * len(texts)))
    taken: Counter = Counter()
    kept = []
    for r in texts:
        who = r["reporter"] or ANONYMOUS
        if taken[who] >= cap:
            held["reporter_cap"].append(r)
            continue
        taken[who] += 1
        kept.append(r)
    return kept, held, cap


def load(name: str, cc: CorpusConfig, dcfg: DataConfig, drops) -> tuple[list[dict], dict[str, Any]]:
    """The store's reports as corpus rows {id, text (normalised), label, source, channel, created_at,
    reporter}, after the guard; and what was read and held back, for the manifest and the feedback card."""
    hint = f"data.corpora.{name}"
    check(name, cc)
    store = _open(cc, hint)
    try:
        reports = store.rows()
    finally:
        store.close()
    usable = []
    for r in reports:
        rid = f"{name}:{r['id']}"
        text = normalize(r["text"], mask_digits=dcfg.mask_digits)
        if not text:
            drops.add(name, "empty_text", rid)
        elif len(text) > dcfg.max_chars:
            drops.add(name, "too_long", rid)
        elif len(text) < dcfg.min_chars:
            drops.add(name, "too_short", rid)
        else:
            usable.append({**r, "normalised": text})
    kept, held, cap = guard(usable, cc.max_reporter_share, cc.min_reporter_rows)
    for reason, rows in held.items():
        for r in rows:
            drops.add(name, reason, f"{name}:{r['id']}")
    same_report = len(usable) - len(kept) - sum(len(v) for v in held.values())
    rows = [{"id": f"{name}:{r['id']}", "text": r["normalised"], "label": LABELS[r["label"]], "source": name,
             "channel": cc.channel, "created_at": r["created_at"], "reporter": r["reporter"] or ANONYMOUS}
            for r in kept]
    dates = sorted(r["created_at"][:10] for r in reports)
    info = {
        "reports": len(reports),
        "reporters": len({r["reporter"] or ANONYMOUS for r in reports}),
        "first_day": dates[0] if dates else None,
        "last_day": dates[-1] if dates else None,
        "same_text_reported_again": same_report,
        "held_back": {k: len(v) for k, v in held.items()},
        "held_back_langs": {k: dict(Counter(language_tag(r["normalised"]) for r in v)) for k, v in held.items()},
        "reporter_cap": cap,
        "kept": len(rows),
    }
    return rows, info


def card(name: str, info: dict, splits: dict[str, list[dict]], drops: dict[str, int]) -> str:
    """The generated data card of the feedback rows of one prepared dataset (markdown)."""
    from training.data import LABEL_NAMES, SPLITS
    from training.mix_card import md_table

    mine = {s: [r for r in splits[s] if r["source"] == name] for s in SPLITS}
    langs = sorted({r["lang"] for s in SPLITS for r in mine[s]})
    split_rows = [[s] + [sum(1 for r in mine[s] if LABEL_NAMES[r["label"]] == lab) for lab in ("spam", "ham")]
                  + [len(mine[s])] for s in SPLITS]
    lang_rows = [[lang] + [sum(1 for s in SPLITS for r in mine[s] if r["lang"] == lang and r["label"] == y)
                           for y in (1, 0)] for lang in langs]
    days = Counter(r["created_at"][:10] for s in SPLITS for r in mine[s])
    held = info.get("held_back", {})
    held_rows = [[k, v, ", ".join(f"{lang} {n}" for lang, n in sorted(info["held_back_langs"].get(k, {}).items()))
                  or "-"] for k, v in held.items()]
    other = {k: v for k, v in drops.items() if k not in held}
    lines = [
        f"# Data card: user feedback reports (`{name}`), generated by make data",
        "",
        "Reports sent to the server's `POST /v1/feedback` (serving/feedback.py), read from the feedback store by",
        "training/feedback_data.py. Labels are what the reporters said; nobody checked them. Texts are what",
        "users received: they may hold personal data, so this card and the prepared data stay where the store is.",
        "",
        f"- reports read: {info['reports']} from {info['reporters']} reporter(s), "
        f"{info['first_day'] or '-'} to {info['last_day'] or '-'} (UTC days)",
        f"- same text and label reported again (kept once): {info['same_text_reported_again']}",
        f"- held back by the poisoning guard: {sum(held.values())} (no reporter above {info['reporter_cap']} texts)",
        f"- kept for the mix: {info['kept']}; in the splits after de-duplication against the corpora: "
        f"{sum(len(v) for v in mine.values())}",
        "",
        "## Held back (never trained on)",
        md_table(["reason", "reports", "languages"], held_rows),
        "",
        "conflicting_labels: the same normalised text reported as spam and as ham; reporter_cap: one reporter's",
        "texts beyond the cap, oldest kept.",
    ]
    if other:
        lines += ["", "Also dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(other.items())) +
                  " (label_conflict: the text is in a corpus with the other label)."]
    lines += ["", "## In the splits", md_table(["split", "spam", "ham", "rows"], split_rows),
              "", "## Languages", md_table(["lang", "spam", "ham"], lang_rows),
              "", "## Reports kept, by day", md_table(["day", "rows"], [[d, n] for d, n in sorted(days.items())]), ""]
    return "\n".join(lines)
