"""make retrain: a candidate trained on the mix plus users' reports, gated against the champion, promoted
only when no gate regresses (docs/DESIGN.md §7).

    make retrain                                    # CONFIG=configs/default.yaml
    make retrain CONFIG=configs/smoke.yaml ARGS="--reload http://127.0.0.1:8000 --admin-key KEY"

1. The candidate: CONFIG with `data.corpora.<retrain.feedback_corpus>` enabled (the server's feedback store,
   training/feedback_data.py), prepared into `<data.output_dir>_feedback` and trained into
   `<train.output_dir>_retrain`, so the champion's own data and model directory stay as they are.
2. The champion: the version of MLflow model `retrain.model_name` under alias `retrain.alias`.
3. Both are scored on the candidate's test split (overall and per language), on its feedback rows
   (agreement with the reporters), and on the out-of-distribution protocols of `retrain.ood_protocols`
   whose files CONFIG names (training/ood.py). Each gate allows the candidate to trail by the tolerance in
   `retrain.tolerance`; per-language scopes under `min_scope_rows` rows are shown, not gated.
   The champion may have trained on some of the candidate's test rows (its split did not hold the reports):
   that favours the champion, so the gates err on the side of keeping it.
4. Every gate passed (or no champion yet): the candidate is exported (the export's parity gates are gates
   too), logged, registered, and the alias moves to it; with --reload the server is told to load the new
   bundle (POST /admin/reload). A failed gate: the table says which, the champion keeps the alias, exit 3.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import Config, ConfigError, cli_args, fail, load_config, with_overrides
from training.data import FEEDBACK

REFUSED = 3  # exit status of a refused promotion (a cron job can tell it from a crash: 1, or a mistake: 2)


class RetrainError(Exception):
    """A user-facing problem (no feedback corpus configured, the champion's model is gone): one line."""


@dataclass
class Gate:
    scope: str  # e.g. test/overall, ood/unseen_ham/lang:zh, feedback/test
    metric: str  # f1 | fpr | accuracy
    champion: float
    candidate: float
    tolerance: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if self.higher_is_better:
            return self.candidate >= self.champion - self.tolerance - 1e-12
        return self.candidate <= self.champion + self.tolerance + 1e-12


# ------------------------------------------------------------------------------------------ the two models


def candidate_config(cfg: Config) -> Config:
    name = cfg.retrain.feedback_corpus
    cc = cfg.data.corpora.get(name)
    if cc is None or cc.format != FEEDBACK:
        raise RetrainError(f"retrain.feedback_corpus is {name!r}, but data.corpora has no such entry with "
                           f"format: feedback (configs/default.yaml has one: copy it into CONFIG)")
    return with_overrides(cfg, [f"data.corpora.{name}.enabled=true",
                                f"data.output_dir={cfg.data.output_dir.rstrip('/')}_feedback",
                                "data.mix_card=",
                                f"train.output_dir={cfg.train.output_dir.rstrip('/')}_retrain",
                                f"tracking.run_name=retrain-{time.strftime('%Y%m%d-%H%M%S')}"])


def find_champion(cfg: Config) -> dict | None:
    """{"version", "run_id", "model_dir"} of the model under the champion alias, None when there is none."""
    from mlflow.exceptions import MlflowException

    from training import tracking

    tracking.setup(cfg)
    client = tracking._client()
    name, alias = cfg.retrain.model_name, cfg.retrain.alias
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such registered model, or no such alias
        return None
    try:
        run = client.get_run(mv.run_id)
    except MlflowException as e:
        raise RetrainError(f"the {alias} ({name} version {mv.version}) points at run {mv.run_id}, which is "
                           f"not in this MLflow store: {e.message}") from None
    return {"version": str(mv.version), "run_id": mv.run_id, "model_dir": tracking.model_dir_of_run(run)}


# ------------------------------------------------------------------------------------------ gates


def scope_gates(where: str, entries: list[dict], cfg: Config, fpr_on_spam_scopes: bool = True) -> list[Gate]:
    """Gates of one protocol's scopes (training/ood.py entries with `champion` and `candidate` sides): F1 where
    the scope has spam, FPR where it has ham (evasion's perturbed-spam scopes share the clean ham: FPR once)."""
    tol = cfg.retrain.tolerance
    gates = []
    for e in entries:
        c, k = e.get("champion"), e.get("candidate")
        if not c or not k:
            continue
        if ":" in e["scope"] and e["rows"] < tol.min_scope_rows:
            continue  # a per-language/script scope too small to gate on
        ham_only = e["spam"] == 0
        if e["spam"] and c.get("f1") is not None and k.get("f1") is not None:
            gates.append(Gate(f"{where}/{e['scope']}", "f1", c["f1"], k["f1"], tol.f1, True))
        if (ham_only or fpr_on_spam_scopes or e["scope"] == "clean") and c.get("fpr") is not None \
                and k.get("fpr") is not None:
            gates.append(Gate(f"{where}/{e['scope']}", "fpr", c["fpr"], k["fpr"], tol.fpr, False))
    return gates


def _agreement(y: np.ndarray, p: np.ndarray, thr: np.ndarray) -> float:
    return float(((p >= thr).astype(int) == y).mean())


def compare(cfg: Config, cand_cfg: Config, scorers: dict, progress=print) -> tuple[list[Gate], dict]:
    """Score both models (scorers: {"champion": ood.Scorer, "candidate": ood.Scorer}) on every gated set.
    Returns the gates and what was measured (for the MLflow log and the printed table)."""
    from training import ood
    from training.data import load_splits

    test = load_splits(cand_cfg)["test"]
    texts, y = list(test["text"]), np.asarray(test["label"], dtype=int)
    progress(f"retrain: scoring the test split ({len(y)} rows) with both models ...")
    scored, langs = ood._score_both(scorers, texts)
    entries = [ood.scope_entry("overall", y, scored)] + ood._group_scopes(langs, y, scored)
    gates = scope_gates("test", entries, cfg)
    measured = {"test": entries}
    fb = np.flatnonzero(np.asarray(test["source"]) == cfg.retrain.feedback_corpus)
    if len(fb):
        acc = {side: _agreement(y[fb], np.asarray(sc.p)[fb], np.asarray(sc.thr)[fb]) for side, sc in scored.items()}
        gates.append(Gate(f"feedback/test ({len(fb)} reports)", "accuracy", acc["champion"], acc["candidate"],
                          cfg.retrain.tolerance.feedback_accuracy, True))
        measured["feedback"] = {"rows": int(len(fb)), **acc}
    else:
        progress("retrain: no feedback row in the test split: the feedback gate is skipped")
    files = {"unseen_ham": cfg.ood.unseen_ham, "eval_sets": cfg.ood.eval_sets, "evasion": cfg.ood.hard_negatives}
    for name in cfg.retrain.ood_protocols:
        if name not in files:
            raise RetrainError(f"retrain.ood_protocols: {name!r} is not one of {', '.join(files)} (the "
                               f"leave-one-corpus-out folds retrain models: run them with make ood)")
        if name != "evasion" and not files[name]:
            progress(f"retrain: ood.{name} names no file: that gate is skipped")
            continue
        progress(f"retrain: out-of-distribution protocol {name} ...")
        try:
            result = ood.evasion(cfg, scorers, test) if name == "evasion" else getattr(ood, name)(cfg, scorers)
        except ood.OodError as e:
            raise RetrainError(str(e)) from None
        gates += scope_gates(f"ood/{name}", result["scopes"], cfg, fpr_on_spam_scopes=name != "evasion")
        measured[f"ood/{name}"] = result["scopes"]
    return gates, measured


def _allowed(g: Gate) -> str:
    """The change a gate allows: '>= -0.005' (may fall by that much), '<= +0.005' (may rise by that much)."""
    return f">= {-g.tolerance:+.3f}" if g.higher_is_better else f"<= {g.tolerance:+.3f}"


def gate_table(gates: list[Gate]) -> str:
    rows = ["| gate | metric | champion | candidate | change | allowed change | |", "|---|---|---|---|---|---|---|"]
    for g in sorted(gates, key=lambda g: g.passed):  # failures first
        change = g.candidate - g.champion
        allowed = _allowed(g)
        rows.append(f"| {g.scope} | {g.metric} | {g.champion:.4f} | {g.candidate:.4f} | {change:+.4f} | {allowed} "
                    f"| {'ok' if g.passed else 'FAILED'} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ promotion


def reload_server(url: str, admin_key: str, bundle_dir: Path, timeout: float = 120.0) -> dict:
    """POST /admin/reload {"bundle": dir}: the server verifies and warms the bundle, then swaps."""
    req = urllib.request.Request(url.rstrip("/") + "/admin/reload", method="POST",
                                 data=json.dumps({"bundle": str(bundle_dir)}).encode("utf-8"),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {admin_key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")[:300]
        raise RetrainError(f"{url}/admin/reload answered {e.code}: {body}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RetrainError(f"cannot reach {url}/admin/reload: {getattr(e, 'reason', e)}") from None


def _log_decision(cand_cfg: Config, run_id: str | None, gates: list[Gate], measured: dict, decision: str,
                  champion: dict | None) -> None:
    if not run_id:
        return
    from mlflow import MlflowClient

    from training import tracking

    tracking.setup(cand_cfg)
    client = MlflowClient()
    client.set_tag(run_id, "spamlingo.promotion", decision)
    client.set_tag(run_id, "spamlingo.champion_run", champion["run_id"] if champion else "")
    client.log_metric(run_id, "retrain/gates_failed", sum(not g.passed for g in gates))
    text = (f"# Promotion: {decision}\n\nchampion: "
            f"{'version ' + champion['version'] + ', run ' + champion['run_id'] if champion else 'none'}\n\n"
            f"{gate_table(gates)}\n")
    client.log_text(run_id, text, "promotion.md")
    client.log_dict(run_id, {"decision": decision, "gates": [g.__dict__ | {"passed": g.passed} for g in gates],
                             "measured": measured}, "promotion.json")


def retrain(cfg: Config, reload_url: str = "", admin_key: str = "", progress=print) -> int:
    """The whole loop; returns the exit status (0 promoted, REFUSED)."""
    from training import ood, tracking
    from training.export import ExportError, export_bundle, log_to_mlflow
    from training.train import train

    cand_cfg = candidate_config(cfg)
    if reload_url and not admin_key:
        raise RetrainError("--reload needs --admin-key (or SPAMLINGO_ADMIN_KEY): the server's /admin/reload key")
    champion = find_champion(cfg)
    if champion:
        progress(f"retrain: champion {cfg.retrain.model_name} version {champion['version']} "
                 f"(run {champion['run_id'][:8]}, {champion['model_dir']})")
    else:
        progress(f"retrain: no champion yet (MLflow model {cfg.retrain.model_name!r} has no alias "
                 f"{cfg.retrain.alias!r}): the candidate becomes the first one if it exports")
    result = train(cand_cfg)
    model_dir, run_id = result.model_dir, result.run_id
    gates: list[Gate] = []
    measured: dict = {}
    if champion:
        scorers = {"champion": ood.model_dir_scorer(champion["model_dir"], cfg.eval.batch_size),
                   "candidate": ood.model_dir_scorer(model_dir, cfg.eval.batch_size)}
        gates, measured = compare(cfg, cand_cfg, scorers, progress)
        progress("\n" + gate_table(gates) + "\n")
    failed = [g for g in gates if not g.passed]
    if failed:
        _log_decision(cand_cfg, run_id, gates, measured, "refused", champion)
        worst = failed[0]
        progress(f"retrain: REFUSED: {len(failed)} gate(s) failed, first {worst.scope} {worst.metric} "
                 f"{worst.champion:.4f} -> {worst.candidate:.4f} (allowed change {_allowed(worst)}); the champion stays "
                 f"{'version ' + champion['version'] if champion else ''}. Candidate: run {run_id}, {model_dir}")
        return REFUSED
    try:
        exported = export_bundle(cand_cfg, model_dir)
    except ExportError as e:
        _log_decision(cand_cfg, run_id, gates, measured, "refused", champion)
        progress(f"retrain: REFUSED: the export's parity gate failed: {e}")
        return REFUSED
    progress(exported.table)
    log_to_mlflow(exported, cand_cfg)
    registered = tracking.register(run_id, cfg.retrain.model_name, cfg.retrain.alias, cand_cfg)
    _log_decision(cand_cfg, run_id, gates, measured, "promoted", champion)
    progress(f"retrain: PROMOTED: {registered['name']} version {registered['version']} is the "
             f"{cfg.retrain.alias} (run {run_id}); bundle {exported.bundle_dir}")
    if reload_url:
        info = reload_server(reload_url, admin_key, exported.bundle_dir)
        progress(f"retrain: {reload_url} reloaded: {json.dumps(info)[:300]}")
    else:
        progress(f"retrain: a running server loads it with SIGHUP (newest bundle) or POST /admin/reload "
                 f'{{"bundle": "{exported.bundle_dir}"}}')
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    parser = cli_args(argv, "Train a candidate on the mix plus the feedback store, gate it against the champion, "
                            "promote it when no gate regresses.")
    parser.add_argument("--reload", default="", metavar="URL",
                        help="after a promotion, POST URL/admin/reload with the new bundle (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--admin-key", default=os.environ.get("SPAMLINGO_ADMIN_KEY", ""),
                        help="the server's --admin-key (default: $SPAMLINGO_ADMIN_KEY)")
    args = parser.parse_args(argv)
    from training.data import DataError
    from training.tracking import TrackingError

    try:
        cfg = load_config(args.config, args.overrides)
        return retrain(cfg, args.reload, args.admin_key)
    except (ConfigError, RetrainError, DataError, TrackingError) as e:
        fail(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
