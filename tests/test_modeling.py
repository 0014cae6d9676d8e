"""training/modeling.py: mean pooling and the linear probe (LP of LP-FT), on the tiny backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.text import Encoder, TextSettings
from training.backbone import load_backbone
from training.config import ConfigError, ModelConfig
from training.modeling import linear_probe, load_classifier, pooled_features, pooling_of, set_pooling

TEXTS = ["恭喜您中奖了，点击链接领取大奖", "明天的会议改到下午三点", "WIN a FREE iphone now, click here",
         "Are we still meeting for lunch?", "무료 쿠폰 지급! 지금 바로 클릭하세요", "明日は何時に集合しますか"]
LABELS = [1, 0, 1, 0, 1, 0]


@pytest.fixture(scope="module")
def mean_model():
    cfg = ModelConfig(backbone="tiny", max_length=32, dropout=0.0, pooling="mean", trim_vocab=False)
    model, tokenizer, info = load_backbone(cfg)
    encoder = Encoder(tokenizer.backend_tokenizer, TextSettings(max_length=32))
    return model.eval(), tokenizer, encoder, info


def test_mean_pooling_is_the_masked_mean_of_the_last_hidden_states(mean_model):
    model, _tok, encoder, info = mean_model
    assert info["pooling"] == "mean" and pooling_of(model) == "mean"
    assert model.bert.pooler is None  # no weights that never get a gradient
    ids, mask = encoder.pad(encoder.encode_batch(TEXTS))
    x, m = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        hidden = model.bert(input_ids=x, attention_mask=m).last_hidden_state
        want = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        logits = model(input_ids=x, attention_mask=m).logits
    assert torch.allclose(model.pooled(x, m), want, atol=1e-6)
    assert torch.allclose(logits, model.classifier(want), atol=1e-6)


def test_padding_does_not_change_a_row(mean_model):
    model, _tok, encoder, _ = mean_model
    encoded = encoder.encode_batch(TEXTS)
    short = min(range(len(TEXTS)), key=lambda i: len(encoded[i].input_ids))
    alone_ids, alone_mask = encoder.pad([encoded[short]])
    batch_ids, batch_mask = encoder.pad(encoded)  # padded to the longest row
    assert batch_ids.shape[1] > alone_ids.shape[1]
    with torch.no_grad():
        alone = model(input_ids=torch.from_numpy(alone_ids), attention_mask=torch.from_numpy(alone_mask)).logits
        batch = model(input_ids=torch.from_numpy(batch_ids), attention_mask=torch.from_numpy(batch_mask)).logits
    assert torch.allclose(alone[0], batch[short], atol=1e-5)


def test_saved_directory_loads_back_with_its_pooling(mean_model, tmp_path):
    model, tokenizer, encoder, _ = mean_model
    model.save_pretrained(tmp_path)
    again = load_classifier(tmp_path).eval()
    assert pooling_of(again) == "mean" and type(again).__name__ == type(model).__name__
    ids, mask = encoder.pad(encoder.encode_batch(TEXTS))
    with torch.no_grad():
        a = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        b = again(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_cls_pooling_keeps_the_family_head(tmp_path):
    model, _tok, _ = load_backbone(ModelConfig(backbone="tiny", max_length=32, trim_vocab=False))
    assert pooling_of(model) == "cls" and model.bert.pooler is not None
    model.save_pretrained(tmp_path)
    assert type(load_classifier(tmp_path)).__name__ == "BertForSequenceClassification"
    with pytest.raises(ConfigError, match="model.pooling"):
        set_pooling(model, "max")


def test_linear_probe_writes_the_logistic_regression_into_the_head(mean_model):
    from sklearn.linear_model import LogisticRegression

    model, _tok, encoder, _ = mean_model
    ids = [e.input_ids for e in encoder.encode_batch(TEXTS * 4)]
    labels = LABELS * 4
    report = linear_probe(model, encoder, ids, labels, C=10.0)
    assert report["rows"] == 24 and report["train_accuracy"] > 0.9
    feats = pooled_features(model, encoder, ids)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    lr = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000, random_state=13)
    lr.fit((feats - mean) / std, labels)
    want = lr.predict_proba((feats - mean) / std)[:, 1]
    with torch.no_grad():
        got = torch.softmax(model.classifier(torch.from_numpy(feats)), -1)[:, 1].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_linear_probe_needs_mean_pooling():
    model, tokenizer, _ = load_backbone(ModelConfig(backbone="tiny", max_length=32, trim_vocab=False))
    encoder = Encoder(tokenizer.backend_tokenizer, TextSettings(max_length=32))
    with pytest.raises(ConfigError, match="pooling=mean"):
        linear_probe(model, encoder, [[0, 5, 2]], [1])
