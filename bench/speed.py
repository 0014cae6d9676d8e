"""Figure speed_engines: PyTorch eager vs ONNX Runtime fp32 vs int8, side by side.

The same padded batches of test-split texts (SMS-length and e-mail-length, tokenised once through the
bundle's encoder) go through the three engines in interleaved rounds with the same thread count, so the
ratios compare engines under the same machine load. Tokenisation is timed separately: it is the same
code for every engine (serving.text.Encoder).
"""

from __future__ import annotations

from bench.inputs import Inputs, load_split, sample_rows
from bench.timing import interleaved, summary

TITLE = "Inference speed: PyTorch eager vs ONNX Runtime fp32 vs int8"
NEEDS = ("model", "bundle", "data")
BATCH_SIZES = (1, 32)
KINDS = (("sms", "SMS-length"), ("email", "e-mail-length"))


def _settings(quick: bool) -> dict:
    if quick:
        return {"texts_per_kind": 32, "rounds": 1, "seconds_per_round": 0.2, "batch_sizes": [1, 8]}
    # ~12 cells x 3 rounds x 1.5 s plus warm-up: about 2 minutes for e5-small on 2 cores.
    return {"texts_per_kind": 256, "rounds": 3, "seconds_per_round": 1.5, "batch_sizes": list(BATCH_SIZES)}


def _engines(inputs: Inputs, threads: int):
    import torch

    from serving.bundle import load_bundle
    from serving.inference import Classifier
    from training.evaluate import load_model

    torch.set_num_threads(threads)
    bundle = load_bundle(inputs.bundle_dir)
    model, _encoder, _meta = load_model(inputs.model_dir, device="cpu")

    def eager(batch):
        ids, mask = batch
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits

    engines = {"pytorch_eager": eager}
    fp32 = Classifier(bundle, variant="fp32", threads=threads)
    engines["onnx_fp32"] = lambda b: fp32.run_encoded(*b)
    notes = {}
    if bundle.has("int8"):
        int8 = Classifier(bundle, variant="int8", threads=threads)
        engines["onnx_int8"] = lambda b: int8.run_encoded(*b)
    else:
        why = bundle.int8.get("reason") or bundle.int8.get("status") or "not exported"
        notes["onnx_int8"] = f"not in the bundle: {why}"
    return engines, fp32, notes


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    import time

    settings = _settings(quick) | {"threads": threads, "seed": seed}
    engines, clf, notes = _engines(inputs, threads)
    test = load_split(inputs, "test")
    cells, tokenize = [], {}
    for kind, label in KINDS:
        rows = sample_rows(test, settings["texts_per_kind"], seed, channel=kind)
        if not rows:
            notes[kind] = f"no {kind} rows in the test split"
            continue
        texts = [r["text"] for r in rows]
        t0 = time.perf_counter()
        prepared = clf.encode(texts)
        encode_s = time.perf_counter() - t0
        tokenize[label] = 1000 * encode_s / len(texts)
        lengths = [len(p) for p in prepared]
        for bs in settings["batch_sizes"]:
            if len(prepared) < bs:
                notes[f"{kind} batch {bs}"] = f"only {len(prepared)} {kind} rows in the test split"
                continue
            # Batches in sample order (not length-sorted): the padding a real request mix would see.
            batches = [clf.pad(prepared[i:i + bs]) for i in range(0, len(prepared) - bs + 1, bs)]
            times = interleaved(engines, batches, rounds=settings["rounds"],
                                seconds_per_round=settings["seconds_per_round"])
            stats = {name: summary(t, bs) for name, t in times.items()}
            base = stats["pytorch_eager"]["texts_per_s"]
            for s in stats.values():
                s["speedup_vs_eager"] = s["texts_per_s"] / base
            cells.append({"texts": kind, "label": label, "batch_size": bs, "engines": stats,
                          "mean_tokens": sum(lengths) / len(lengths),
                          "truncated_share": sum(p.truncated for p in prepared) / len(prepared)})
    return {"settings": settings, "cells": cells, "tokenize_ms_per_text": tokenize, "notes": notes}


_NAMES = {"pytorch_eager": "PyTorch eager", "onnx_fp32": "ONNX Runtime fp32", "onnx_int8": "ONNX Runtime int8"}


def render(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['threads']} threads for every engine; texts sampled from the test split ({s['texts_per_kind']} "
             f"per kind, seed {s['seed']}), batches in sample order with dynamic padding; {s['rounds']} "
             f"interleaved rounds of ~{s['seconds_per_round']} s per engine and cell. Model time only: "
             "tokenisation (the same for every engine) is listed separately.", "",
             "| texts | mean tokens | batch | engine | ms/batch p50 | ms/batch p90 | texts/s | × eager |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for c in result["cells"]:
        for name, st in c["engines"].items():
            lines.append(f"| {c['label']} | {c['mean_tokens']:.0f} | {c['batch_size']} | {_NAMES.get(name, name)} | "
                         f"{st['ms_per_batch_p50']:.1f} | {st['ms_per_batch_p90']:.1f} | {st['texts_per_s']:.1f} | "
                         f"{st['speedup_vs_eager']:.2f} |")
    tok = [f"{label} {ms:.2f} ms/text" for label, ms in result.get("tokenize_ms_per_text", {}).items()]
    if tok:
        lines += ["", "Tokenisation (normalise + encode, serving.text): " + ", ".join(tok) + "."]
    for k, v in result.get("notes", {}).items():
        lines += ["", f"- {k}: {v}"]
    return "\n".join(lines)
