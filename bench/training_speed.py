"""Figure speed_training: training samples/s with and without length-grouped batching.

A short timed loop (forward, weighted cross-entropy, backward, AdamW step) on the run's own model
directory (the backbone it trained: same layers, trimmed vocabulary, frozen parts as its config says),
fed from the training split through training.train's encoder, collator and LengthGroupedSampler. The two
batch orders take turns in interleaved rounds on the same model and thread count.
"""

from __future__ import annotations

import random

from bench.inputs import Inputs, load_split, run_config
from bench.timing import interleaved, summary

TITLE = "Training throughput: length-grouped vs random batches"
NEEDS = ("model", "data")


def _settings(quick: bool) -> dict:
    if quick:
        return {"rounds": 1, "steps_per_round": 2, "warmup_steps": 1}
    # 2 x (1 + 12) steps: about 3 minutes for e5-small (batch 16, 128 tokens) on 2 busy cores.
    return {"rounds": 3, "steps_per_round": 4, "warmup_steps": 1}


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    import torch

    from training.backbone import count_parameters, freeze
    from training.evaluate import load_model
    from training.train import Collator, encode
    from training.trainer import LengthGroupedSampler, class_weights

    settings = _settings(quick) | {"threads": threads, "seed": seed}
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg, cfg_source = run_config(inputs)
    bs = cfg.train.batch_size
    # The model's own encoder (its tokenizer.json and TextSettings): batches as training built them.
    model, encoder, meta = load_model(inputs.model_dir, device="cpu")
    frozen = freeze(model, cfg.model.freeze_embeddings, cfg.model.freeze_layers)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)

    # A pool as large as one of LengthGroupedSampler's mega-batches (50 batches) at least, so the grouped
    # order is the one training sees; both orders draw their steps from the same pool.
    steps = settings["warmup_steps"] + settings["rounds"] * settings["steps_per_round"]
    train = load_split(inputs, "train")
    pool_n = min(len(train), max(50 * bs, steps * bs) * 2)
    idx = sorted(random.Random(seed).sample(range(len(train)), pool_n))
    rows = train.select(idx)
    data = encode(encoder, list(rows["text"]), list(rows["label"]), "bench pool", show=False)
    collate = Collator(encoder)
    weight = torch.tensor(class_weights(data.labels), dtype=torch.float32)

    def batches(order: list[int], rng: random.Random) -> list[dict]:
        # Steps drawn at random from the whole epoch over the pool: LengthGroupedSampler puts the longest
        # batches first in each mega-batch, so its first steps alone would overstate the width.
        every = [order[k:k + bs] for k in range(0, len(order) - bs + 1, bs)]
        picked = sorted(rng.sample(range(len(every)), min(steps, len(every))))
        return [collate([data[i] for i in every[j]]) for j in picked]

    grouped = list(iter(LengthGroupedSampler(data.lengths, bs, seed)))
    shuffled = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    orders = {"length_grouped": batches(grouped, random.Random(seed)),
              "random": batches(shuffled, random.Random(seed + 1))}

    def step(batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], weight=weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = interleaved({k: step for k in orders}, orders, rounds=settings["rounds"], seconds_per_round=0.0,
                        min_batches=settings["steps_per_round"], warmup=settings["warmup_steps"])
    modes = {}
    for name, t in times.items():
        timed = orders[name][settings["warmup_steps"]:]
        real = sum(int(b["attention_mask"].sum()) for b in timed)
        padded = sum(b["attention_mask"].numel() for b in timed)
        st = summary(t, bs)
        modes[name] = {"samples_per_s": st["texts_per_s"], "ms_per_step_p50": st["ms_per_batch_p50"],
                       "steps": st["calls"], "padding_share": 1 - real / padded, "mean_width": padded / len(timed) / bs}
    grouped_sps, random_sps = modes["length_grouped"]["samples_per_s"], modes["random"]["samples_per_s"]
    modes["length_grouped"]["speedup_vs_random"] = grouped_sps / random_sps
    info = {"backbone": inputs.meta.get("backbone"), "parameters": count_parameters(model),
            "trainable_parameters": count_parameters(model, trainable_only=True), "frozen": frozen,
            "batch_size": bs, "max_length": meta["text"].get("max_length"), "pool_rows": pool_n, "config": cfg_source}
    return {"settings": settings, "model": info, "modes": modes}


def render(result: dict) -> str:
    s, m, modes = result["settings"], result["model"], result["modes"]
    lines = [f"Backbone {m['backbone']} from the run's model directory ({m['trainable_parameters']:,} of "
             f"{m['parameters']:,} parameters trainable), batch size {m['batch_size']}, max_length {m['max_length']}, "
             f"{s['threads']} threads; {s['rounds']} interleaved rounds of {s['steps_per_round']} optimizer steps per "
             f"order after {s['warmup_steps']} warm-up steps; steps drawn at random from one epoch over "
             f"{m['pool_rows']} training rows.", "",
             "| batch order | steps | samples/s | ms/step p50 | mean padded width | padding share |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in modes.items():
        lines.append(f"| {name.replace('_', '-')} | {r['steps']} | {r['samples_per_s']:.1f} | "
                     f"{r['ms_per_step_p50']:.0f} | "
                     f"{r['mean_width']:.0f} | {r['padding_share']:.1%} |")
    lines += ["", f"Length-grouped / random: **{modes['length_grouped']['speedup_vs_random']:.2f}×** samples/s."]
    return "\n".join(lines)
