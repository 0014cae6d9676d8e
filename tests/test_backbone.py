"""Backbones: the tiny random BERT, the converted multilingual-e5-small, vocabulary trimming, offline errors."""

from __future__ import annotations

import torch

from training.backbone import load_backbone
from training.config import ModelConfig

TEXTS = ["Free entry in 2 a wkly comp to win FA Cup final tkts", "恭喜您中奖了！点击 http://x.cn 领取 iPhone",
         "今すぐクリックしてください", "무료 쿠폰을 받으세요", "see you at lunch?"]


def _logits(model, tokenizer, texts):
    model.eval()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_tiny_builds_runs_and_is_deterministic():
    cfg = ModelConfig(backbone="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2)
    model, tokenizer, info = load_backbone(cfg)
    assert model.config.num_labels == 2 and model.config.id2label == {0: "ham", 1: "spam"}
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 128
    assert info["backbone"] == "tiny" and info["vocab_size"] == len(tokenizer) == 250002
    logits = _logits(model, tokenizer, TEXTS)
    assert logits.shape == (len(TEXTS), 2) and torch.isfinite(logits).all()
    again, _, _ = load_backbone(cfg)
    assert torch.equal(logits, _logits(again, tokenizer, TEXTS))
    # word embeddings frozen, the rest trainable
    assert not model.get_input_embeddings().weight.requires_grad
    assert info["trainable_parameters"] == info["parameters"] - model.get_input_embeddings().weight.numel()


def test_num_layers_freeze_layers_and_dropout():
    cfg = ModelConfig(backbone="tiny", tiny_layers=3, num_layers=2, freeze_layers=1, dropout=0.25,
                      freeze_embeddings=False)
    model, tokenizer, info = load_backbone(cfg)
    layers = model.bert.encoder.layer
    assert len(layers) == 2 and model.config.num_hidden_layers == 2 and info["layers"] == {"before": 3, "kept": 2}
    assert all(not p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert model.get_input_embeddings().weight.requires_grad
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.25 for p in drops)
    assert _logits(model, tokenizer, TEXTS).shape == (len(TEXTS), 2)
