"""Training-step speed of the LLM kit: transformers' Trainer against a hand-written loop, the answer-only
LM head against the model's own loss, and a bfloat16 against a float32 frozen base (factors float32).

Model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), TL6 rank 8 on q/k/v (the quick job's setting);
data: SNLI training prompts of the packaged source (seed 0), batch 4, max_len 256. Each repetition runs
every contender for ``--steps`` optimizer steps (after one warm-up repetition), in a rotated order;
tokens/s = real tokens / seconds of the training loop proper (Trainer construction excluded, reported
apart). One process, ``--threads`` torch threads.

    python benchmarks/llm_step.py [--reps 7 --steps 2 --threads 1 --out benchmarks/results/llm-step]
    python benchmarks/llm_step.py --overhead    # the Trainer's own cost, on a tiny model where compute is ~0

``--overhead`` times whole calls of the hand loop and of ``finetune`` (Trainer) for 10 and 50 steps on a
2-layer, width-32 random Llama: the difference gives the per-step cost, the rest the fixed cost per call.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from tying.integrations import transformers as tx
from tying.integrations.llm import finetune as ft
from tying.integrations.llm.models import BUILTIN, load_model
from tying.integrations.llm.tasks import collate, encode_example, load_nli

import tying


def hand_loop(model, examples, tok, steps, lr, batch_size, seed):
    """The pre-Trainer loop: the same order, AdamW, LR schedule, clipping and answer loss as finetune."""
    data = [encode_example(tok, e["prompt"], e["answer"], 256) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ft._schedule("linear", steps, 1))
    order, tokens = ft.stream_order(len(data), steps * batch_size, seed), 0
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = collate([data[i] for i in order[step * batch_size:(step + 1) * batch_size]], tok.pad_token_id)
        loss = ft.answer_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        tokens += int(batch["attention_mask"].sum())
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "loss": loss.item()}


def model_loss(model, batch, num_items=None):
    """The model's own loss: logits (and the LM head) at every position."""
    return model(**batch, **({} if num_items is None else {"num_items_in_batch": num_items})).loss


def run(name, models, examples, tok, steps, seed):
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    model = models[dtype]
    tying.apply_(model, tx.spec(model, "tl6", rank=8), dtype=torch.float32)
    t0 = time.perf_counter()
    try:
        if name.startswith("loop"):
            h = hand_loop(model, examples, tok, steps, 3e-3, 4, seed)
        else:
            ft.answer_loss = model_loss if "model loss" in name else ANSWER_LOSS
            h = ft.finetune(model, examples, tok, steps=steps, lr=3e-3, batch_size=4, seed=seed, warmup=1,
                            progress=False)
    finally:
        ft.answer_loss = ANSWER_LOSS
        tying.unapply_(model)
    return {"tokens_per_s": h["tokens"] / h["seconds"], "overhead_s": time.perf_counter() - t0 - h["seconds"]}


def overhead(args) -> None:
    """Per-step and fixed cost of the Trainer against the hand loop on a tiny model (compute ~0)."""
    import transformers

    tok = load_model("smollm2-135m")[1]
    examples, _ = load_nli(n_train=50, n_test=1, seed=0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=len(tok))
    calls = {"loop": hand_loop, "Trainer": lambda m, e, t, steps, lr, bs, seed: ft.finetune(
        m, e, t, steps=steps, lr=lr, batch_size=bs, seed=seed, warmup=1, progress=False)}
    times = {(n, k): [] for n in calls for k in (10, 50)}
    for _rep in range(args.reps):
        for (name, steps), seconds in times.items():
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(cfg)
            tying.apply_(model, tx.spec(model, "tl6", rank=8))
            t0 = time.perf_counter()
            calls[name](model, examples, tok, steps, 3e-3, 4, 0)
            seconds.append(time.perf_counter() - t0)
    rows = []
    for name in calls:
        a, b = statistics.median(times[name, 10]), statistics.median(times[name, 50])
        rows.append({"contender": name, "call_10_steps_s": a, "call_50_steps_s": b, "per_step_ms": 1e3 * (b - a) / 40,
                     "fixed_s": a - 10 * (b - a) / 40})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_step_overhead.json").write_text(json.dumps({"rows": rows, "raw": {f"{n} {k}": v for (n, k), v in
                                                                                 times.items()}}, indent=1))
    lines = [(f"Trainer overhead: tiny random Llama (2 layers, width 32), TL6 rank 8, SNLI prompts, batch 4; "
              f"median of {args.reps} alternated repetitions, {torch.get_num_threads()} thread(s), {platform.machine()} CPU."),
             "", "| contender | 10-step call s | 50-step call s | per step ms | fixed s per call |", "|---|---|---|---|---|"]
    lines += [f"| {r['contender']} | {r['call_10_steps_s']:.2f} | {r['call_50_steps_s']:.2f} | {r['per_step_ms']:.1f} | "
              f"{r['fixed_s']:.2f} |" for r in rows]
    (out / "llm_step_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


ANSWER_LOSS = ft.answer_loss
CONTENDERS = ["loop fp32", "Trainer fp32", "Trainer fp32 model loss", "Trainer bf16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--overhead", action="store_true", help="the Trainer's own cost on a tiny model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/llm-step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.overhead:
        return overhead(args)
    models = {dt: load_model("smollm2-135m", dtype=dt)[0] for dt in (torch.float32, torch.bfloat16)}
    tok = load_model("smollm2-135m")[1]
    examples, _ = load_nli(n_train=200, n_test=1, seed=0)
    for name in CONTENDERS:  # warm-up
        run(name, models, examples, tok, 1, 0)
    results = {n: [] for n in CONTENDERS}
    for rep in range(args.reps):
        order = CONTENDERS[rep % len(CONTENDERS):] + CONTENDERS[:rep % len(CONTENDERS)]
        for name in order:
            results[name].append(run(name, models, examples, tok, args.steps, rep))
        print(f"rep {rep}: " + ", ".join(f"{n} {results[n][-1]['tokens_per_s']:.0f} tok/s" for n in CONTENDERS), flush=True)
    base = results["loop fp32"]
    rows = []
    for name in CONTENDERS:
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(results[name], base)]
        tps = [r["tokens_per_s"] for r in results[name]]
        rows.append({"contender": name, "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
                     "tokens_per_s_max": max(tps), "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
                     "ratio_max": max(ratios), "overhead_s_median": statistics.median(r["overhead_s"] for r in results[name])})
    setup = {"model": BUILTIN["smollm2-135m"], "adapter": "tl6 rank 8 on q/k/v, factors float32",
             "data": "SNLI train (packaged source), 200 examples, seed 0", "batch": 4, "max_len": 256,
             "steps_per_measurement": args.steps, "reps": args.reps, "threads": args.threads,
             "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), no GPU; torch {torch.__version__}"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_step.json").write_text(json.dumps({"setup": setup, "rows": rows, "raw": results}, indent=1))
    lines = [(f"Training-step speed, {setup['model']}, {setup['adapter']}; {setup['data']}; batch 4, "
              f"{args.steps} steps per measurement, {args.reps} repetitions (contenders alternated); {setup['machine']}."),
             "",
             "| contender | tokens/s (median) | ratio to loop fp32: min / median / max | setup s (median) |",
             "|---|---|---|---|"]
    lines += [f"| {r['contender']} | {r['tokens_per_s_median']:.0f} | {r['ratio_min']:.2f} / {r['ratio_median']:.2f} / "
              f"{r['ratio_max']:.2f} | {r['overhead_s_median']:.2f} |" for r in rows]
    (out / "llm_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    random.seed(0)
    main()
