"""`make retrain` end to end on the real smoke config shrunk (training/retrain.py): reports sent to a real
server process on 127.0.0.1, a candidate trained on them, gated against the champion in a real MLflow store,
promoted and hot-reloaded into that server, and a refused promotion that leaves the champion where it was."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from test_feedback_data import SHRINK as DATA_SHRINK
from test_feedback_data import words
from training.config import load_config

SMOKE = "configs/smoke.yaml"
SHRINK = DATA_SHRINK + ["model.tiny_hidden=32", "train.batch_size=16", "export.parity_rows=0"]
ADMIN = "admin-key"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def loop(tmp_path, monkeypatch, tiny_bundle):
    """A real server (admin key, feedback store in tmp_path) with reports sent to it, a real MLflow store,
    small out-of-distribution files, and the overrides of a shrunk smoke retrain."""
    import torch

    from test_server import start_server

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    server = start_server(tiny_bundle, tmp_path, "--admin-key", ADMIN)
    monkeypatch.setenv("SPAMLINGO_FEEDBACK_DB", f"sqlite:///{tmp_path / 'feedback.db'}")
    for i in range(12):
        for who, text, label in (("ops1", f"claim your reward now {words(i)}", "spam"),
                                 ("ops2", f"恭喜您获得大礼包 {words(100 + i)} 点击领取", "spam"),
                                 ("ops3", f"see you later {words(200 + i)}", "ham")):
            r = httpx.post(server.url + "/v1/feedback", json={"text": text, "label": label, "reporter": who},
                           timeout=30)
            assert r.status_code == 201, r.text
    unseen = _jsonl(tmp_path / "unseen.jsonl", [{"text": t, "label": "ham"} for t in
                    ["我们周末去爬山吧", "the library opens at nine on sundays", "明日は雨が降るそうです",
                     "오늘 회의는 취소되었습니다", "thanks for dinner last night"] * 3])
    evalset = _jsonl(tmp_path / "eval.jsonl", [{"text": t, "label": y} for t, y in
                     [("恭喜中奖请点击链接领取", "spam"), ("your parcel is held, pay the fee at hxxp://x.top", "spam"),
                      ("晚饭吃什么", "ham"), ("see you tomorrow", "ham")] * 3])
    hard = _jsonl(tmp_path / "hard.jsonl", [{"text": "Your verification code is xxxxxx. Do not share it.",
                                             "label": "ham"}, {"text": "您的快递已放入驿站，请凭取件码取件", "label": "ham"}])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"server": server, "overrides": SHRINK + [
        f"data.output_dir={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}",
        f"export.output_dir={tmp_path / 'bundles'}", "tracking.experiment=test-retrain",
        f"ood.unseen_ham=[{unseen}]", f"ood.eval_sets=[{evalset}]", f"ood.hard_negatives=[{hard}]",
        "ood.evasion_spam_rows=20", "ood.evasion_ham_rows=40"]}
    torch.set_num_threads(before)
    server.stop()


def _champion() -> tuple[str, str]:
    from mlflow import MlflowClient

    cfg = load_config(SMOKE)  # the smoke config registers under a name of its own
    mv = MlflowClient().get_model_version_by_alias(cfg.retrain.model_name, cfg.retrain.alias)
    return mv.version, mv.run_id


def test_retrain_promotes_reloads_the_server_then_refuses_a_worse_candidate(loop, tmp_path, capsys):
    from mlflow import MlflowClient

    from training.retrain import REFUSED, main

    server = loop["server"]
    # 1. no champion yet: the candidate is promoted, registered, exported and loaded by the running server
    code = main(["--config", SMOKE, *loop["overrides"], "--reload", server.url, "--admin-key", ADMIN])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no champion yet" in out and "PROMOTED" in out
    version, run_id = _champion()
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["spamlingo.promotion"] == "promoted"
    assert run.data.params["data.corpora.feedback.enabled"] == "true"
    bundles = sorted((tmp_path / "bundles").iterdir())
    assert len(bundles) == 1
    ready = httpx.get(server.url + "/readyz", timeout=10).json()
    assert bundles[0].name in json.dumps(ready), ready  # the server swapped to the promoted bundle
    card = (tmp_path / "data_feedback" / "feedback_card.md").read_text(encoding="utf-8")
    assert "reports read: 36 from 3 reporter(s)" in card
    # the server still answers, from the new bundle
    r = httpx.post(server.url + "/v1/classify", json={"texts": ["hello"]}, timeout=30)
    assert r.status_code == 200

    # 2. a champion exists; a gate the candidate cannot pass (it must beat the champion's F1 by 1.0)
    code = main(["--config", SMOKE, *loop["overrides"], "retrain.tolerance.f1=-1.0"])
    out = capsys.readouterr().out
    assert code == REFUSED, out
    assert "REFUSED" in out and "test/overall f1" in out and f"the champion stays version {version}" in out
    assert "| FAILED |" in out and "feedback/test" in out and "ood/unseen_ham/overall" in out
    assert _champion() == (version, run_id)  # the alias did not move
    refused = [r for r in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("test-retrain").experiment_id])
        if r.data.tags.get("spamlingo.promotion") == "refused"]
    assert len(refused) == 1
    assert "promotion.md" in {a.path for a in MlflowClient().list_artifacts(refused[0].info.run_id)}
    assert len(list((tmp_path / "bundles").iterdir())) == 1  # nothing exported


def test_gates_pass_for_the_same_model_and_fail_beyond_the_tolerance(tiny_model_dir, tmp_path):
    from training import ood
    from training.config import with_overrides
    from training.retrain import Gate, scope_gates

    cfg = load_config(SMOKE)
    scorer = ood.model_dir_scorer(tiny_model_dir)
    unseen = _jsonl(tmp_path / "u.jsonl", [{"text": t, "label": "ham"} for t in ["晚饭吃什么", "see you soon"] * 60])
    cfg = with_overrides(cfg, [f"ood.unseen_ham=[{unseen}]", "retrain.tolerance.min_scope_rows=50"])
    result = ood.unseen_ham(cfg, {"champion": scorer, "candidate": scorer})
    gates = scope_gates("ood/unseen_ham", result["scopes"], cfg)
    assert gates and all(g.passed for g in gates) and {g.metric for g in gates} == {"fpr"}
    assert {g.scope for g in gates} >= {"ood/unseen_ham/overall", "ood/unseen_ham/lang:zh"}
    assert Gate("x", "fpr", 0.010, 0.015, 0.005, False).passed
    assert not Gate("x", "fpr", 0.010, 0.0151, 0.005, False).passed
    assert not Gate("x", "f1", 0.90, 0.894, 0.005, True).passed
