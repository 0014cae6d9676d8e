"""int8 recipes for an exported fp32 graph (step 4 of training/export.py): which nodes each remedy keeps
out of dynamic quantisation, and the quantisation itself. export.py tries them in order, cheapest first,
behind its parity gates."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import warnings
from pathlib import Path


def sensitive_nodes(path: Path, num_layers: int) -> dict:
    """Names of the nodes the 'exclude_sensitive' recipe keeps in fp32: the weight-bearing MatMul/Attention
    nodes of the last encoder layer and the head, and the embedding lookups.

    (The pooler and classifier are Gemm nodes; dynamic quantisation turns them into MatMulInteger. A
    mean-pooled model's head is kept in fp32 by training/token_scores.py `keep_head_fp32`.)
    The last layer starts after the last node named for the layer before it ("…/layer.10/…"): a fused
    Attention node carries no layer in its name but sits in the graph's (topological) order. Without
    layer names at all, the last 1/num_layers of those nodes is taken."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    nodes = list(graph.node)
    weighted = [i for i, n in enumerate(nodes) if n.op_type in ("MatMul", "Attention") and n.name]
    layer_of = {}
    for i, n in enumerate(nodes):
        found = re.findall(r"layers?[._/](\d+)[._/]", n.name + "/")
        if found:
            layer_of[i] = int(found[-1])
    if layer_of and max(layer_of.values()) > 0:
        before_last = max(layer_of.values()) - 1
        boundary = max(i for i, layer in layer_of.items() if layer == before_last)
        tail = [nodes[i].name for i in weighted if i > boundary]
    else:
        k = max(1, math.ceil(len(weighted) / max(1, num_layers)))
        tail = [nodes[i].name for i in weighted[-k:]]
    initializers = {t.name for t in graph.initializer}
    emb = [n.name for n in nodes if n.name and n.op_type in ("Gather", "EmbedLayerNormalization")
           and any(i in initializers for i in n.input)]
    # The feed-forward output projections read the GELU activations, whose outliers are what a per-batch
    # activation scale handles worst (the usual int8 loss in BERT-style encoders).
    ffn_out: dict[int, list[str]] = {}
    matmuls: list[str] = []  # every projection inside a layer that is a plain MatMul: attention output, FFN
    for i in weighted:
        name = nodes[i].name
        if i in layer_of and re.search(r"[./]output[./]dense", name) and "attention" not in name:
            ffn_out.setdefault(layer_of[i], []).append(name)
        if i in layer_of and nodes[i].op_type == "MatMul" and re.search(r"[./](output|intermediate)[./]dense", name):
            matmuls.append(name)
    return {"last_layer_and_head": tail, "embeddings": emb, "ffn_out": ffn_out, "layer_matmuls": matmuls}


def blocks_everywhere(path: Path) -> dict | None:
    """The recipe whose graph does not depend on batch-mates: every MatMul with a weight as 8-bit blocks
    (activations quantised per block of a row), nothing quantised per tensor (the head, Gemm or MatMul, stays
    fp32). Only on a graph without fused Attention nodes, whose input quantisation takes one scale per batch
    tensor; None otherwise. Measured on the default model (validation, against fp32): 99.87% label agreement
    where int8_blocks_matmuls on the fused graph gives 99.77%, 38.7 MB, 1.2-1.35x slower in batches of 32
    (make bench), and a probability that moves by 1e-6 with its batch-mates instead of up to 0.08."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(n.op_type == "Attention" for n in graph.node):  # MultiHeadAttention has no weights: it stays fp32
        return None
    weights = {t.name for t in graph.initializer}
    weighted = [n.name for n in graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]
    if not weighted:
        return None
    # the quantizer rewrites a Gemm as "<name>_MatMul" + "<name>_Add" before it reads nodes_to_exclude
    every = [name for n in graph.node if n.op_type in ("MatMul", "Gemm")
             for name in ([n.name, n.name + "_MatMul"] if n.op_type == "Gemm" else [n.name])]
    return {"name": "int8_blocks_unfused", "method": "dynamic", "per_channel": True, "reduce_range": False,
            "nodes_to_exclude": every, "weight_only_nodes": weighted, "bits": 8, "block_size": 32,
            "symmetric": False, "accuracy_level": 4}


def int8_recipes(fp32_path: Path, num_layers: int, unfused_path: Path | None = None) -> list[dict]:
    """The remedies; the first that passes both gates ships. First the one that does not depend on
    batch-mates (`blocks_everywhere`, on `unfused_path`: the fp32 graph with attention left unfused), then
    the others smallest first. On the default e5-small run (8 layers, 56,663 pieces) int8_blocks_ffn_out is
    37.2 MB and fp32_ffn_out 50.7 MB: keeping one layer's feed-forward output projection in fp32 costs ~1.8 MB."""
    nodes = sensitive_nodes(fp32_path, num_layers)
    # "source": the graph export._int8 quantises; without an unfused graph (nothing was fused) the fp32 one
    first = blocks_everywhere(unfused_path or fp32_path)
    ffn = nodes["ffn_out"]
    lower = [n for layer in sorted(ffn)[: (len(ffn) + 1) // 2] for n in ffn[layer]]
    every = [n for layer in sorted(ffn) for n in ffn[layer]]
    recipes = [{**first, "source": "unfused" if unfused_path else "fp32"}] if first else []
    recipes += [
        {"name": "plain", "method": "dynamic", "per_channel": False, "reduce_range": False},
        {"name": "per_channel", "method": "dynamic", "per_channel": True, "reduce_range": False},
        {"name": "per_channel_reduce_range", "method": "dynamic", "per_channel": True, "reduce_range": True},
    ]
    if ffn:
        layers = sorted(ffn)
        # 8-bit blocks of 32 weights (MatMulNBits, asymmetric; each block of 32 activations quantised on its
        # own at run time), where dynamic quantisation has one activation scale per tensor: measured on the
        # default model (800 validation texts, mean |Δz| vs fp32): FFN output projections alone 1.06 (37.3 MB),
        # every layer MatMul 0.60 (38.1 MB, ~1.4x slower than fp32_ffn_out); fp32_ffn_out 0.96 (50.7 MB)
        blocks = {"bits": 8, "block_size": 32, "symmetric": False, "accuracy_level": 4}
        recipes += [
            {"name": "int8_blocks_ffn_out", "method": "dynamic", "per_channel": True, "reduce_range": False,
             "nodes_to_exclude": every, "weight_only_nodes": every, **blocks},
            {"name": "int8_blocks_matmuls", "method": "dynamic", "per_channel": True, "reduce_range": False,
             "nodes_to_exclude": nodes["layer_matmuls"], "weight_only_nodes": nodes["layer_matmuls"], **blocks},
        ]
        # fp32 for the lowest one or two layers' projections first: ~1.8 MB each with e5-small, where the
        # lower half of 8 layers costs ~7 MB (the int8 bundle has a 40 MB budget)
        recipes += [
            {"name": f"fp32_ffn_out_lower_{k}", "method": "dynamic", "per_channel": True, "reduce_range": False,
             "nodes_to_exclude": [n for layer in layers[:k] for n in ffn[layer]]}
            for k in (1, 2) if k < (len(ffn) + 1) // 2
        ]
        recipes += [
            {"name": "fp32_ffn_out_lower_half", "method": "dynamic", "per_channel": True, "reduce_range": False,
             "nodes_to_exclude": lower},
            {"name": "fp32_ffn_out", "method": "dynamic", "per_channel": True, "reduce_range": False,
             "nodes_to_exclude": every},
        ]
    return recipes + [
        {"name": "exclude_sensitive", "method": "dynamic", "per_channel": True, "reduce_range": False,
         "nodes_to_exclude": nodes["last_layer_and_head"] + nodes["embeddings"]},
        # (symmetric 8-bit blocks were measured 3x further from fp32 than asymmetric ones on e5-small)
        {"name": "weight_only", "method": "weight_only", "bits": 8, "block_size": 32, "symmetric": False},
    ]


def _with_shapes(src: Path, dst: Path) -> Path:
    """A fused graph holds ONNX Runtime contrib ops (Attention, SkipLayerNormalization...) that ONNX's own
    shape inference cannot type, and quantize_dynamic needs those types: run ONNX Runtime's symbolic
    shape inference (which knows them) once and quantize that copy. A plain graph is returned as is."""
    import onnx

    model = onnx.load(str(src))
    if not any(n.domain == "com.microsoft" for n in model.graph.node):
        return src
    if not dst.exists():
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        onnx.save(SymbolicShapeInference.infer_shapes(model, auto_merge=True), str(dst))
    return dst


def _weight_only(src: Path, dst: Path, recipe: dict, nodes: list[str] | None = None) -> None:
    """MatMul weights as MatMulNBits blocks (all MatMuls with a constant weight, or only `nodes`)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    # the quantizer takes every MatMul *or* a node of nodes_to_include: the others are excluded by name (the
    # head that training/token_scores.py keeps in fp32 among them)
    chosen = set(nodes or ())
    others = [n.name for n in model.graph.node if chosen and n.op_type == "MatMul" and n.name not in chosen]
    q = MatMulNBitsQuantizer(model, bits=recipe["bits"], block_size=recipe["block_size"],
                             is_symmetric=recipe["symmetric"], accuracy_level=recipe.get("accuracy_level"),
                             nodes_to_include=list(nodes) if nodes else None, nodes_to_exclude=others)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize(src: Path, dst: Path, recipe: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" notice
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if recipe["method"] == "dynamic":
            src = _with_shapes(src, dst.with_name(".shapes.onnx"))
            quantize_dynamic(str(src), str(dst), per_channel=recipe["per_channel"],
                             reduce_range=recipe["reduce_range"], weight_type=QuantType.QInt8,
                             nodes_to_exclude=recipe.get("nodes_to_exclude") or None)
            if recipe.get("weight_only_nodes"):  # then those nodes (left fp32 above) get weight-only int8
                _weight_only(dst, dst, recipe, recipe["weight_only_nodes"])
        elif recipe["method"] == "weight_only":
            _weight_only(src, dst, recipe)
        else:
            raise ValueError(f"unknown int8 method {recipe['method']!r}")
