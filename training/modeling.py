"""The classifier on top of the encoder: mean pooling (how multilingual-e5 was pretrained) and the linear
probe that initialises its head before fine-tuning (LP-FT, Kumar et al. 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution").

Why: a fresh head on a randomly initialised pooler makes the first fine-tuning steps rewrite the pretrained
features to suit that head; a head fitted first on the frozen, mean-pooled features starts where the
pretrained features already separate spam from ham, so fine-tuning moves them less, and what the encoder
learnt about text it was not fine-tuned on (other languages, channels, registers) survives better.

`model.pooling=mean` turns any `*ForSequenceClassification` of the BERT/XLM-R families into the same class
with a masked mean over the last hidden states and one linear layer (`classifier`); the choice is stored in
the model's config.json (`spamlingo_pooling`), and `load_classifier` rebuilds the right class from a saved
directory. The forward signature and the `logits` output are unchanged, so the Trainer, evaluation and the
ONNX export treat both poolings alike.
"""

from __future__ import annotations

import time
from pathlib import Path

POOLINGS = ("cls", "mean")
CONFIG_KEY = "spamlingo_pooling"

_CLASSES: dict[type, type] = {}


def _mean_pool_class(base: type) -> type:
    """`base` (a transformers sequence classifier) with masked mean pooling and a linear head."""
    if base in _CLASSES:
        return _CLASSES[base]
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPooled(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            _strip_head(self, config)

        def hidden_states(self, input_ids, attention_mask):
            """The encoder's last hidden states (batch, seq, hidden)."""
            body = getattr(self, self.base_model_prefix)
            return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        def pooled(self, input_ids, attention_mask):
            """Masked mean of the last hidden states: padding never counts."""
            return masked_mean(self.hidden_states(input_ids, attention_mask), attention_mask)

        def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            logits = self.classifier(self.head_dropout(self.pooled(input_ids, attention_mask)))
            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    MeanPooled.__name__ = MeanPooled.__qualname__ = f"MeanPooled{base.__name__}"
    _CLASSES[base] = MeanPooled
    return MeanPooled


def masked_mean(hidden, attention_mask):
    """Mean of `hidden` (batch, seq, h) over the positions where `attention_mask` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def logits_and_token_scores(model, input_ids, attention_mask):
    """(logits (batch, 2), token_scores (batch, seq)) of a mean-pooled model from ONE encoder pass.

    The head is linear on the mean of the n unmasked hidden states h_i (dropout is the identity in eval), so
    the spam-minus-ham logit is exactly z = sum_i s_i / n + (b_spam - b_ham) with s_i = (w_spam - w_ham) . h_i:
    token_scores holds s_i / n at unmasked positions and 0 at padding. This is an exact additive split of z
    given the contextual hidden states (a token's score still depends on its neighbours through attention).
    The ONNX export's second output is this function's (training/token_scores.py); `make eval`'s error
    report uses it too, so both show the same decomposition. The logits are computed as `forward` does."""
    hidden = model.hidden_states(input_ids, attention_mask)
    logits = model.classifier(model.head_dropout(masked_mean(hidden, attention_mask)))
    w = model.classifier.weight
    mask = attention_mask.to(hidden.dtype)
    n = mask.sum(1, keepdim=True).clamp(min=1.0)
    scores = (hidden * (w[1] - w[0])).sum(-1) * mask / n
    return logits, scores


def token_scorer(model, encoder):
    """serving/explain.py's TokenScorer for a mean-pooled PyTorch model: (logits, each row's token scores)
    of serving.text.Encoded rows in one forward pass (`make eval`'s error report)."""
    import torch

    def run(encoded):
        ids, mask = encoder.pad(encoded)
        device = next(model.parameters()).device
        with torch.inference_mode():
            logits, scores = logits_and_token_scores(model, torch.from_numpy(ids).to(device),
                                                     torch.from_numpy(mask).to(device))
        scores = scores.float().cpu().numpy()
        return logits.float().cpu().numpy(), [scores[i, :len(e.input_ids)] for i, e in enumerate(encoded)]

    return run


def head_bias(model) -> float:
    """b_spam - b_ham of a mean-pooled model's linear head: z - sum(token_scores)."""
    b = model.classifier.bias
    return float((b[1] - b[0]).detach().float()) if b is not None else 0.0


def _strip_head(model, config) -> None:
    """Drop the CLS pooler (unused: it must not hold trainable weights that get no gradient under DDP) and
    put one linear layer where the family's head was."""
    import torch

    body = getattr(model, model.base_model_prefix)
    if getattr(body, "pooler", None) is not None:
        body.pooler = None
    p = getattr(config, "classifier_dropout", None)
    p = config.hidden_dropout_prob if p is None else p
    model.head_dropout = torch.nn.Dropout(p)
    model.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
    setattr(model.config, CONFIG_KEY, "mean")  # saved in config.json: load_classifier reads it


def set_pooling(model, pooling: str):
    """Return `model` with `pooling` ("cls" leaves it as the family built it; "mean" swaps the head)."""
    if pooling not in POOLINGS:
        from training.config import ConfigError

        raise ConfigError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "cls" or pooling_of(model) == "mean":
        return model
    # The same modules and weights under the mean-pooling class: no copy of the encoder is made.
    model.__class__ = _mean_pool_class(type(model))
    _strip_head(model, model.config)
    return model


def pooling_of(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, CONFIG_KEY, "cls") or "cls"


def load_classifier(model_dir: str | Path, **kwargs):
    """A saved classifier directory, with the pooling it was trained with."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = AutoConfig.from_pretrained(str(model_dir), **kwargs)
    if pooling_of(config) != "mean":
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kwargs)
    base = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    return _mean_pool_class(base).from_pretrained(str(model_dir), config=config, **kwargs)


# ------------------------------------------------------------------------------------------ linear probe


def pooled_features(model, encoder, input_ids: list[list[int]], batch_size: int = 64, desc: str = "features"):
    """Mean-pooled encoder features (float32 numpy, input order) of already encoded rows, no gradients."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from serving.text import Encoded

    order = np.argsort([-len(x) for x in input_ids], kind="stable")
    out = None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="msg", leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = encoder.pad(Encoded(input_ids[i], False) for i in idx)
                feats = model.pooled(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
                feats = feats.float().cpu().numpy()
                if out is None:
                    out = np.empty((len(order), feats.shape[1]), dtype=np.float32)
                out[idx] = feats
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


def linear_probe(model, encoder, input_ids: list[list[int]], labels: list[int], C: float = 1.0,
                 class_weight: str | None = "balanced", batch_size: int = 64, seed: int = 13) -> dict:
    """Fit a logistic regression on the frozen mean-pooled features and write it into the model's head, so
    that fine-tuning starts from it (the LP of LP-FT). Returns a report for MLflow."""
    import numpy as np
    import torch

    if pooling_of(model) != "mean":
        from training.config import ConfigError

        raise ConfigError("train.linear_probe=true needs model.pooling=mean (the probe reads mean-pooled features)")
    t0 = time.perf_counter()
    x = pooled_features(model, encoder, input_ids, batch_size, desc="linear probe: features")
    y = np.asarray(labels)
    w, b, train_acc = fit_probe(x, y, C, class_weight, seed)
    # Two logits whose difference is the probe's log-odds: softmax(logits)[1] equals the probe's probability.
    with torch.no_grad():
        head = model.classifier
        head.weight.copy_(torch.from_numpy(np.stack([-w / 2, w / 2]).astype(np.float32)))
        head.bias.copy_(torch.tensor([-b / 2, b / 2], dtype=torch.float32))
    return {"rows": int(len(y)), "C": C, "train_accuracy": train_acc, "seconds": time.perf_counter() - t0,
            "feature_norm_mean": float(np.linalg.norm(x, axis=1).mean())}


def fit_probe(x, y, C: float = 1.0, class_weight: str | None = "balanced", seed: int = 13):
    """(w, b, training accuracy) of a logistic regression on standardised features `x`, with the
    standardisation folded in: w·((x-m)/s)+b' = (w/s)·x + (b' - w·m/s), so x @ w + b is the log-odds of spam."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y)
    mean, std = x.mean(0), x.std(0) + 1e-6
    lr = LogisticRegression(C=C, class_weight=class_weight, max_iter=2000, random_state=seed)
    lr.fit((x - mean) / std, y)
    w = lr.coef_[0] / std
    b = float(lr.intercept_[0] - (lr.coef_[0] * mean / std).sum())
    return w, b, float((lr.predict((x - mean) / std) == y).mean())
