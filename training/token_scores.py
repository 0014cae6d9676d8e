"""The `token_scores` output that training/export.py adds to the graph of a mean-pooled model (DESIGN §5).

A mean-pooled model's spam-minus-ham logit is exactly z = sum_i token_scores_i + bias, where token_scores_i =
(w_spam - w_ham) . h_i / n over the n unmasked tokens (training/modeling.py `logits_and_token_scores`) and bias
= b_spam - b_ham. The graph computes both outputs from the same hidden states (the scores cost one
(batch, seq, hidden) multiply-and-sum beside the head), so serving/explain.py explains a text from the pass that
classifies it. The scores are an elementwise Mul + ReduceSum, which dynamic int8 quantisation leaves in fp32
(like the head's Gemm): the int8 decomposition is exact on the int8 graph's own hidden states too.

`gate` checks that in the exported graph, through serving's Classifier: max |sum(token_scores) + bias - z| over
the parity rows, and that padding positions score exactly 0. A cls-pooled model gets no such output; its
bundle lists `outputs: ["logits"]` and is explained by occlusion.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TOKEN_SCORES = "token_scores"
FP32_LIMIT = 1e-4  # max |sum(token_scores) + bias - (logit_spam - logit_ham)| in the fp32 graph
INT8_LIMIT = 1e-3  # the same in the int8 graph (its hidden states are int8's, the sum is fp32)


def applies(model) -> bool:
    """Whether `model` (a loaded classifier) gets a token_scores output: mean pooling and a linear head."""
    import torch

    from training.modeling import pooling_of

    return pooling_of(model) == "mean" and isinstance(getattr(model, "classifier", None), torch.nn.Linear)


def outputs(model, logits: str = "logits") -> list[str]:
    return [logits, TOKEN_SCORES] if applies(model) else [logits]


def wrapper(model):
    """A module with named tensor inputs returning (logits, token_scores) in one encoder pass."""
    import torch

    from training.modeling import logits_and_token_scores

    class Decomposed(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return logits_and_token_scores(self.m, input_ids, attention_mask)

    return Decomposed(model).eval()


def manifest_entry(model) -> dict:
    from training.modeling import head_bias

    return {"bias": head_bias(model),
            "definition": "logits[:, 1] - logits[:, 0] == token_scores.sum(1) + bias; token_scores[i] = "
                          "(w_spam - w_ham) . h_i / n at the n unmasked positions, 0 at padding"}


def gate(classifier, prepared: Sequence, bias: float, limit: float) -> dict:
    """The decomposition check on `classifier`'s graph (a serving.inference.Classifier of the bundle being
    built) over the parity rows `prepared`."""
    logits, scores = classifier.decompose(prepared)
    z = logits[:, 1] - logits[:, 0]
    sums = np.asarray([s.sum(dtype=np.float64) for s in scores])
    err = np.abs(sums + bias - z)
    # padding: the shortest and the longest row in one batch, so the short one is padded
    items = sorted(prepared, key=len)
    pair = [items[0], items[-1]] if items else []
    pad_max = 0.0
    if len(pair) == 2 and len(pair[0]) < len(pair[1]):
        ids, mask = classifier.pad(pair)
        _, padded = classifier.run_decomposed(ids, mask)
        pad_max = float(np.abs(padded[mask == 0]).max())
    max_err = float(err.max()) if err.size else 0.0
    return {"rows": int(len(err)), "max_abs_sum_error": max_err,
            "mean_abs_sum_error": float(err.mean()) if err.size else 0.0, "max_abs_padding_score": pad_max,
            "bias": float(bias), "limit": limit, "passed": bool(max_err <= limit and pad_max == 0.0)}


def keep_head_fp32(recipes: list[dict], fp32_path) -> list[dict]:
    """The int8 recipes with the linear head left in fp32 by every dynamic one. quantize_dynamic turns the
    head's Gemm into a MatMulInteger on the quantised pooled vector, which moves z by ~1e-2 away from the
    fp32 sum of the token scores (measured on the tiny model); in fp32 the head costs nothing (2 x hidden
    weights) and the int8 graph's decomposition is exact on its own hidden states."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    head = [n for n in graph.node if n.name and n.op_type in ("Gemm", "MatMul")
            and ("classifier" in n.name or outputs & set(n.output))]
    # the quantizer rewrites a Gemm as "<name>_MatMul" + "<name>_Add" before it reads nodes_to_exclude
    head = [name for n in head for name in ([n.name, n.name + "_MatMul"] if n.op_type == "Gemm" else [n.name])]
    return [{**r, "nodes_to_exclude": list(r.get("nodes_to_exclude") or []) + head} if r["method"] == "dynamic"
            else r for r in recipes]
