"""serving.bundle (manifest, checksums, newest bundle) and serving.inference (Classifier) on real bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.bundle import (
    FORMAT_VERSION,
    BundleError,
    file_digest,
    load_bundle,
    newest_bundle,
    write_manifest,
)
from serving.inference import Classifier, length_batches, spam_probability

ROOT = Path(__file__).resolve().parent.parent

MIXED = [
    "WIN a FREE iphone now! Click http://win.example.com to claim your prize",
    "Are we still meeting for lunch tomorrow at noon?",
    "恭喜您中奖了!点击链接领取手机大奖,限时优惠",
    "明天公司的会议改到下午三点,请准时参加",
    "おめでとうございます!旅行が当選しました。今すぐこちらをクリックして受け取ってください",
    "明日の会議は何時に集合しますか?",
    "축하합니다! 여행 당첨되셨습니다. 지금 링크를 눌러 상품을 받으세요",
    "내일 회의 몇 시에 만날까요?",
    "FREE 免费 iPhone 点击 http://x.example 领取 now",
    "",
]


def _fake_bundle(directory: Path, **overrides) -> Path:
    """A bundle directory with placeholder files (load_bundle never opens the graph)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(b"fp32 graph bytes")
    (directory / "tokenizer.json").write_text("{}", encoding="utf-8")
    manifest = {
        "format_version": FORMAT_VERSION, "labels": ["ham", "spam"], "threshold": 0.42,
        "text": {"mask_digits": True, "max_length": 64, "truncation": "head_tail", "head_tokens": 0},
        "inputs": ["input_ids", "attention_mask"], "output": "logits",
        "models": {"fp32": "model.onnx", "int8": None},
        "int8": {"status": "failed", "recipe": None, "reason": "test: no int8"},
        "parity": {}, "metrics": {"export": {"rows": 3}}, "source": {"mlflow_run_id": None, "backbone": "tiny"},
        "created_at": "2025-01-01T00:00:00+00:00",
    }
    manifest.update(overrides)
    write_manifest(directory, manifest)
    return directory


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_round_trip(tmp_path):
    d = _fake_bundle(tmp_path / "b")
    raw = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
    assert set(raw["files"]) == {"model.onnx", "tokenizer.json"}  # bundle.json does not list itself
    assert raw["files"]["model.onnx"] == file_digest(d / "model.onnx")
    assert raw["files"]["model.onnx"]["bytes"] == len(b"fp32 graph bytes")
    b = load_bundle(d)
    assert b.threshold == 0.42 and b.labels == ["ham", "spam"]
    # written before per-language thresholds (no "thresholds"): a policy of the single threshold
    assert b.thresholds["default"] == 0.42 and b.thresholds["by_lang"] == {}
    assert b.summary()["thresholds_by_lang"] == {}
    assert b.text.truncation == "head_tail" and b.text.max_length == 64
    assert b.inputs == ["input_ids", "attention_mask"]
    assert b.models == {"fp32": "model.onnx", "int8": None}
    assert b.metrics == {"export": {"rows": 3}} and b.source["backbone"] == "tiny"
    assert b.model_path("fp32") == d / "model.onnx"
    assert not b.has("int8")
    with pytest.raises(BundleError, match="no int8 model: test: no int8"):
        b.model_path("int8")


def test_file_digest_matches_hashlib(tmp_path):
    import hashlib

    p = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # > 1 MiB: more than one read chunk
    p.write_bytes(data)
    assert file_digest(p) == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_tampered_file_is_detected(tmp_path):
    d = _fake_bundle(tmp_path / "b")
    (d / "model.onnx").write_bytes(b"fp32 graph bytez")  # same size, different content
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.onnx"):
        load_bundle(d)
    assert load_bundle(d, verify=False).threshold == 0.42  # verify=False skips the check on purpose


def test_missing_file_is_detected(tmp_path):
    d = _fake_bundle(tmp_path / "b")
    (d / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        load_bundle(d)


def test_unlisted_model_is_refused(tmp_path):
    d = _fake_bundle(tmp_path / "b")
    manifest = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
    del manifest["files"]["model.onnx"]
    (d / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError, match=r"model\.onnx is not listed"):
        load_bundle(d)


@pytest.mark.parametrize("version", [2, None, "1"])
def test_unsupported_format_version(tmp_path, version):
    d = _fake_bundle(tmp_path / "b", format_version=version)
    with pytest.raises(BundleError, match="unsupported format version"):
        load_bundle(d)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        load_bundle(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bundle.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "bad")


POLICY = {"default": 0.42, "by_lang": {"ko": 0.2, "zh": 0.8}, "rule": "max_recall_at_fpr", "target_fpr": 0.01,
          "min_rows": {"ham": 100, "spam": 20}, "languages": {}}


def test_bundle_with_per_language_thresholds(tmp_path):
    b = load_bundle(_fake_bundle(tmp_path / "b", thresholds=POLICY))
    assert b.threshold == 0.42 and b.thresholds["by_lang"] == {"ko": 0.2, "zh": 0.8}
    assert b.summary()["thresholds_by_lang"] == {"ko": 0.2, "zh": 0.8}


@pytest.mark.parametrize("thresholds, says", [
    ({**POLICY, "by_lang": {"klingon": 0.3}}, "unknown language tag"),
    ({**POLICY, "by_lang": {"ko": "low"}}, "thresholds.by_lang.ko' must be a number"),
    ({**POLICY, "default": 0.5}, "differs from 'thresholds.default'"),
    ("0.42", "must be an object"),
])
def test_bad_thresholds_are_refused(tmp_path, thresholds, says):
    with pytest.raises(BundleError, match=r"bundle\.json: invalid thresholds: .*" + says):
        load_bundle(_fake_bundle(tmp_path / "b", thresholds=thresholds))


def test_newest_bundle(tmp_path):
    with pytest.raises(BundleError, match="no bundle found"):
        newest_bundle(tmp_path)
    _fake_bundle(tmp_path / "old", created_at="2025-01-01T00:00:00+00:00")
    _fake_bundle(tmp_path / "new", created_at="2025-06-01T00:00:00+00:00")
    _fake_bundle(tmp_path / ".partial", created_at="2026-01-01T00:00:00+00:00")  # export in progress
    assert newest_bundle(tmp_path) == tmp_path / "new"


def test_serving_imports_no_torch_or_transformers():
    # The serving side must run where only onnxruntime, tokenizers and numpy are installed.
    code = ("import sys, serving.bundle, serving.inference, serving.text; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------ classifier


def test_real_bundle_verifies(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.has("fp32") and b.has("int8")
    assert set(b.manifest["files"]) == {"model.onnx", "model.int8.onnx", "tokenizer.json"}


def test_tampered_real_graph_is_refused(tiny_bundle, tmp_path):
    d = Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))
    data = bytearray((d / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a weight
    (d / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.int8\.onnx"):
        load_bundle(d)


def test_classify_fields_and_languages(tiny_bundle):
    b = load_bundle(tiny_bundle)
    clf = Classifier(b, variant="auto")
    assert clf.variant == "int8"
    out = clf.classify(MIXED)
    assert len(out) == len(MIXED)
    for r in out:
        assert set(r) == {"label", "spam_probability", "threshold", "threshold_scope", "lang", "truncated"}
        assert 0.0 <= r["spam_probability"] <= 1.0
        assert r["label"] == ("spam" if r["spam_probability"] >= b.threshold else "ham")
        assert r["threshold"] == b.threshold and r["threshold_scope"] == "global"  # no per-language ones
    assert [r["lang"] for r in out[:8]] == ["en", "en", "zh", "zh", "ja", "ja", "ko", "ko"]
    assert out[-1]["lang"] == "other" and not out[-1]["truncated"]
    # the model learnt the templates: spam/ham in alternation for the eight templated texts
    assert [r["label"] for r in out[:8]] == ["spam", "ham"] * 4


def test_classifier_is_deterministic_and_order_independent(tiny_bundle):
    clf = Classifier(load_bundle(tiny_bundle), variant="fp32", batch_size=3)
    a = clf.predict_proba(MIXED)
    assert np.array_equal(a, clf.predict_proba(MIXED))
    rev = clf.predict_proba(MIXED[::-1])[::-1]
    np.testing.assert_allclose(rev, a, atol=1e-6)
    one = Classifier(load_bundle(tiny_bundle), variant="fp32", batch_size=1).predict_proba(MIXED)
    np.testing.assert_allclose(one, a, atol=1e-6)  # padding width does not change a text's score


def test_run_encoded_on_a_padded_batch(tiny_bundle):
    clf = Classifier(load_bundle(tiny_bundle), variant="fp32")
    prepared = clf.encode(MIXED[:4])
    ids, mask = clf.pad(prepared)
    assert ids.dtype == np.int64 and ids.shape == mask.shape and ids.shape[0] == 4
    logits = clf.run_encoded(ids, mask)
    assert logits.shape == (4, 2)
    np.testing.assert_allclose(spam_probability(logits), clf.predict_proba(MIXED[:4]), atol=1e-6)


def test_int8_close_to_fp32(tiny_bundle):
    b = load_bundle(tiny_bundle)
    p32 = Classifier(b, variant="fp32").predict_proba(MIXED)
    p8 = Classifier(b, variant="int8").predict_proba(MIXED)
    assert np.abs(p32 - p8).max() < 0.05
    assert np.array_equal(p32 >= b.threshold, p8 >= b.threshold)


def test_length_batches_sorted_and_complete():
    lengths = [5, 2, 9, 2, 7]
    batches = length_batches(lengths, 2)
    assert batches == [[1, 3], [0, 4], [2]]
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_spam_probability_is_softmax():
    logits = np.array([[0.0, 0.0], [1.0, -2.0], [-500.0, 500.0], [3.0, 1.0]], dtype=np.float32)
    e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    expected = (e / e.sum(axis=1, keepdims=True))[:, 1]
    np.testing.assert_allclose(spam_probability(logits), expected, atol=1e-12)


def test_classifier_applies_the_threshold_of_each_language(tiny_bundle, tmp_path):
    """The same probability gets different labels in two languages; each result says which threshold
    applied. (bundle.json is not among its own checksums: editing its policy keeps the bundle valid.)"""
    d = Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))
    manifest = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
    manifest["thresholds"] = {**manifest["thresholds"], "by_lang": {"ko": 0.2, "zh": 0.8}}
    (d / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    clf = Classifier(load_bundle(d), variant="fp32")
    assert clf.threshold == manifest["threshold"] == 0.5
    ko, en, zh = clf.encode(["내일 회의 몇 시에 만날까요?", "see you at lunch?", "明天公司的会议改到下午三点"])
    got = [clf.result(x, 0.3) for x in (ko, en, zh)]
    assert [r["label"] for r in got] == ["spam", "ham", "ham"]
    assert [(r["threshold"], r["threshold_scope"]) for r in got] == [(0.2, "lang:ko"), (0.5, "global"), (0.8, "lang:zh")]
    assert clf.result(zh, 0.6)["label"] == "ham" and clf.result(en, 0.6)["label"] == "spam"
    # the whole path too: every result at its language's threshold
    for r in clf.classify(MIXED):
        want = {"ko": 0.2, "zh": 0.8}.get(r["lang"], 0.5)
        assert r["threshold"] == want and r["label"] == ("spam" if r["spam_probability"] >= want else "ham")
        assert r["threshold_scope"] == (f"lang:{r['lang']}" if r["lang"] in ("ko", "zh") else "global")
