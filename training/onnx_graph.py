"""The PyTorch classifier as an ONNX graph (step 2 of training/export.py): its reference logits, the traced
graph (logits, and token_scores for a mean-pooled model: training/token_scores.py) with dynamic batch and
sequence axes, and ONNX Runtime's transformer fusions. The gates that decide whether a graph ships are
training/parity.py's; the int8 recipes are training/quantize.py's."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from serving.inference import Prepared, length_batches
from training import token_scores as TS

GRAPH_INPUTS = ["input_ids", "attention_mask"]  # what serving.text.Encoder produces; single-segment
# messages need no token_type_ids (the model's default, zeros, is what training used too)
OUTPUT = "logits"
# ONNX Runtime's transformer optimizer handles these encoder families as "bert".
_FUSABLE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra"}


def torch_logits(model, encoder, prepared: Sequence[Prepared], batch_size: int = 32,
                 show: bool = False):
    """PyTorch logits of prepared texts, in the same length-sorted sub-batches the Classifier uses."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    out = np.empty((len(prepared), 2), dtype=np.float64)
    batches = length_batches([len(p) for p in prepared], batch_size)
    with torch.inference_mode():
        for idx in tqdm(batches, desc="PyTorch reference", unit="batch", disable=not show, leave=False):
            ids, mask = encoder.pad([prepared[k].encoded for k in idx])
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            out[idx] = logits.float().numpy()
    return out


class _LogitsOnly:
    """Wraps the classifier so the graph has named tensor inputs and one output, `logits`."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

        return Wrapper(model).eval()


def example_batch(encoder, prepared: Sequence[Prepared]):
    """Two real rows of different lengths (so padding and the mask are traced), at least 8 tokens wide."""
    import torch

    items = sorted(prepared, key=len)[:1] + sorted(prepared, key=len)[-1:] if prepared else []
    if len(items) < 2:
        items = (list(items) * 2)[:2]
    ids, mask = encoder.pad([i.encoded for i in items]) if items else (None, None)
    if ids is None or ids.shape[1] < 8:
        import numpy as np

        ids = np.full((2, 8), 5, dtype=np.int64)
        mask = np.ones_like(ids)
        mask[1, 5:] = 0
    return torch.from_numpy(ids), torch.from_numpy(mask)


def export_graph(model, path: Path, example, opset: int, exporter: str) -> dict:
    """torch.onnx.export of the logits (and, for a mean-pooled model, token_scores: training/token_scores.py)
    to `path` with dynamic batch/sequence axes; returns facts to record."""
    import onnx
    import torch

    names = TS.outputs(model, OUTPUT)
    wrapper = TS.wrapper(model) if len(names) > 1 else _LogitsOnly(model)
    axes = {OUTPUT: {0: "batch"}, TS.TOKEN_SCORES: {0: "batch", 1: "sequence"}}
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper, example, str(path), input_names=GRAPH_INPUTS, output_names=names,
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                              "attention_mask": {0: "batch", 1: "sequence"}, **{n: axes[n] for n in names}},
                opset_version=opset, dynamo=False,
            )
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            seq = torch.export.Dim("sequence", min=2, max=max(8, model.config.max_position_embeddings - 2))
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            torch.onnx.export(
                wrapper, example, str(path), input_names=GRAPH_INPUTS, output_names=names,
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), opset_version=opset,
                dynamo=True, external_data=False, verbose=False,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    seconds = time.perf_counter() - t0
    graph = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(graph)
    actual = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"exporter": exporter, "opset": actual, "seconds": round(seconds, 2), "torch": torch.__version__}


def optimize_graph(src: Path, dst: Path, model_config, attention: bool = True) -> dict:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, Gelu...). Graph-level only
    (opt_level 0): hardware-specific rewrites are left to the session at load time. `attention=False` leaves
    the attention projections as plain MatMuls (the int8 graph quantises them in blocks: training/quantize.py;
    ONNX Runtime's MultiHeadAttention fusion, which would keep them outside a fused node, does not match this
    graph)."""
    model_type = getattr(model_config, "model_type", "")
    if model_type not in _FUSABLE:
        return {"applied": False, "reason": f"no ONNX Runtime fusions for model type '{model_type}'"}
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = attention
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):
        opt = optimize_model(str(src), model_type="bert", num_heads=model_config.num_attention_heads,
                             hidden_size=model_config.hidden_size, opt_level=0, optimization_options=options)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if not fused:
        return {"applied": False, "reason": "no fusion pattern matched"}
    opt.save_model_to_file(str(dst))
    return {"applied": True, "fused": fused}
