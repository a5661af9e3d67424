"""One multi-task adapter serving up to 1,024 tasks in one mixed batch, against one task, and against PEFT's mixed
batch of LoRAs.

    python benchmarks/serving_tasks.py [--tasks 1 16 256 1024] [--rows 1024] [--seq 8] [--prompt 4]
                                       [--new-tokens 4] [--reps 7] [--threads 1] [--peft 16 256] [--quick]
                                       [--out benchmarks/results/serving-tasks]

Model: a SmolLM2-135M-shaped Llama (30 layers, d 576, 9 heads / 3 KV heads), random weights (seed 0), float32,
CPU. Adapter: "TL6 across tasks" at rank 8 on q/k/v (``load_spec("tl6", rank=8, tasks=...)``: A and B shared by
every layer, projection and task; u per layer and task, v per module and task), random factors (seed 0), saved
as ONE folder and served with ``tying.load_adapters_`` (tasks ``mt/t<i>``). Every row of a batch of ``--rows``
rows names a task, round-robin over the first T tasks: the rows share A and B and differ in u and v, so each
site computes ``A x`` and ``B h`` once for the batch and scales per row (tying.serving's shared route).

- Resident bytes with 1, 16, 256 and 1,024 tasks loaded, and per extra task (against the expected
  L (r + d_q + 2 d_kv) floats of u and v per task, plus its index table); PEFT: bytes per LoRA adapter.
- Tokens/s of a forward pass (``--rows`` x ``--seq`` tokens, ``logits_to_keep=1``) and of greedy generation
  (``--new-tokens`` from ``--prompt``-token prompts, KV cache) with T distinct tasks in the batch, T in
  ``--tasks``, against every row on one task (``tasks-1``); PEFT gets the first tasks exported as plain LoRAs
  (``export_peft`` of each task's adapter) and runs the same batch over ``--peft`` distinct adapters with
  ``adapter_names`` (as many as it holds in this run). Contenders alternate inside each repetition; ratios per
  repetition, min / median / max.

Writes ``<out>/serving_tasks.json`` and ``<out>/serving_tasks.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serving import MODEL, build_model, machine, summary, time_one  # benchmarks/ is not a package

import tying
from tying.bank import FactorBank
from tying.serving import resident_bytes
from tying.state import write_adapter


def write_multitask(model, tasks: list[str], rank: int, out: Path) -> Path:
    """One multi-task TL6 folder with random factors (seed 0): A and B shared, u and v per task."""
    spec = tying.load_spec("tl6", rank=rank, tasks=tasks)
    state = FactorBank(tying.plan(model, spec)).state_dict()
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.05).contiguous() for k, v in state.items()}
    return write_adapter(out, spec, tensors)


def run(args) -> dict:
    from peft import PeftModel
    from tying.integrations.peft import export_peft

    most = max(args.tasks)
    tasks = [f"t{i}" for i in range(most)]
    tmp = Path(tempfile.mkdtemp(prefix="serving-tasks-"))
    model = build_model()
    folder = write_multitask(model, tasks, args.rank, tmp / "multitask")
    t = time_one(lambda: tying.load_adapters_(model, {"mt": folder}))
    print(f"{most} tasks loaded from one folder in {t:.1f} s; {resident_bytes(model):,} bytes", flush=True)
    memory = []
    for n in sorted(set(args.tasks)):  # resident bytes with the first n tasks loaded: unload the others
        probe = build_model()
        tying.load_adapters_(probe, {"mt": folder})
        for name in tasks[n:]:
            tying.unload_adapter_(probe, f"mt/{name}")
        memory.append({"tasks": n, "bytes": resident_bytes(probe)})
        del probe
    per_task = (memory[-1]["bytes"] - memory[0]["bytes"]) / max(memory[-1]["tasks"] - memory[0]["tasks"], 1)
    cfg = model.config
    d_kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    expected = cfg.num_hidden_layers * (args.rank + cfg.hidden_size + 2 * d_kv) * 4
    print(f"bytes per extra task {per_task:,.0f} (u and v alone: {expected:,})", flush=True)

    peft_n = max(args.peft) if args.peft else 0
    peft = None
    if peft_n:
        base = build_model()
        dirs = [export_peft(base, tmp / "peft" / name, adapter=folder, task=name) for name in tasks[:peft_n]]
        peft = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=tasks[0]).eval()
        for name, d in zip(tasks[1:peft_n], dirs[1:]):
            peft.load_adapter(str(d), adapter_name=name)
        peft_bytes = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if ".lora_" in n) / peft_n
        print(f"PEFT holds {peft_n} LoRAs, {peft_bytes:,.0f} bytes each", flush=True)

    rows = args.rows
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (rows, args.seq), generator=g)
    prompts = torch.randint(0, cfg.vocab_size, (rows, args.prompt), generator=g)
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
           "pad_token_id": 0}

    def names(n):
        return [f"mt/{tasks[i % n]}" for i in range(rows)]

    def forward(batch):
        with tying.adapters(model, batch):
            model(ids, logits_to_keep=1)

    def generate(batch):
        with tying.adapters(model, batch):
            model.generate(prompts, **gen)

    contenders = {"forward": {}, "generate": {}}
    for n in sorted(set(args.tasks)):
        batch = names(n)
        contenders["forward"][f"tasks-{n}"] = lambda b=batch: forward(b)
        contenders["generate"][f"tasks-{n}"] = lambda b=batch: generate(b)
    for n in args.peft:
        batch = [tasks[i % n] for i in range(rows)]
        contenders["forward"][f"peft-{n}"] = lambda b=batch: peft(input_ids=ids, adapter_names=b, logits_to_keep=1)
        contenders["generate"][f"peft-{n}"] = lambda b=batch: peft.generate(input_ids=prompts, adapter_names=b, **gen)
    tokens = {"forward": rows * args.seq, "generate": rows * args.new_tokens}
    speed = {}
    with torch.inference_mode():
        for job, fns in contenders.items():
            for fn in fns.values():  # warm-up
                fn()
            per_rep = {k: [] for k in fns}
            for rep in range(args.reps):
                for k in list(fns) if rep % 2 == 0 else list(reversed(fns)):
                    per_rep[k].append(tokens[job] / time_one(fns[k]))
                print(f"{job} rep {rep}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in per_rep.items()), flush=True)
            one = per_rep["tasks-1"]
            speed[job] = {"tokens_per_s": {k: summary(v) for k, v in per_rep.items()},
                          "vs_one_task": {k: summary([a / b for a, b in zip(v, one)]) for k, v in per_rep.items()
                                          if k != "tasks-1"}}
    shape = {"forward_tokens": args.seq, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens}
    return {"model": MODEL, "adapter": f"TL6 across tasks, rank {args.rank}, q/k/v", "quick": args.quick,
            "data": "random token ids (seed 0)", "rows": rows, "shape": shape, "reps": args.reps,
            "threads": args.threads, "load_s": t, "memory": memory, "bytes_per_extra_task": per_task,
            "u_v_bytes_per_task": expected, "machine": machine(), "speed": speed,
            "peft": {"adapters": peft_n, "bytes_per_adapter": peft_bytes} if peft_n else None}


def table(r: dict) -> str:
    s = r["shape"]
    head = (f"Model: {r['model']}; adapter: {r['adapter']}; {r['machine']}; {r['threads']} thread(s); "
            f"{r['reps']} alternated repetitions (min / median / max); {'quick size' if r['quick'] else 'full size'}.")
    lines = [head, "", "**Resident bytes of the served multi-task adapter**", "", "| tasks loaded | bytes |", "|---|---|"]
    lines += [f"| {m['tasks']:,} | {m['bytes']:,} |" for m in r["memory"]]
    lines += ["", (f"Per extra task: **{r['bytes_per_extra_task']:,.0f} bytes** (its u and v: "
                   f"{r['u_v_bytes_per_task']:,}; the rest is its index table).")]
    if r["peft"]:
        p = r["peft"]["bytes_per_adapter"]
        lines.append(f"PEFT, one LoRA per task (export_peft): {p:,.0f} bytes per adapter, "
                     f"{p / r['bytes_per_extra_task']:.0f}x tying's per extra task.")
    what = {"forward": f"forward, {r['rows']} rows x {s['forward_tokens']} tokens",
            "generate": f"generate {s['new_tokens']} tokens, {r['rows']} rows, {s['prompt_tokens']}-token prompts, KV cache"}
    for job in ("forward", "generate"):
        sp = r["speed"][job]
        lines += ["", f"**Tokens/s, {what[job]}**, T distinct tasks in the batch (round-robin over the rows)", "",
                  "| contender | tokens/s (median) | vs every row on one task |", "|---|---|---|"]
        for k, v in sp["tokens_per_s"].items():
            rat = sp["vs_one_task"].get(k)
            cell = "1" if rat is None else f"{rat['median']:.2f}x ({rat['min']:.2f}-{rat['max']:.2f})"
            lines.append(f"| {k} | {v['median']:,.0f} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peft", type=int, nargs="*", default=[16, 256], help="distinct LoRAs in PEFT's mixed batch")
    ap.add_argument("--quick", action="store_true", help="a smoke size: 1 and 16 tasks, 32 rows, PEFT 16, 2 reps")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving-tasks")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.rows, args.peft, args.reps = [1, 16], 32, [16], 2
    if 1 not in args.tasks:
        ap.error("--tasks must include 1: every ratio is against one task")
    if max(args.tasks + args.peft) > args.rows:
        ap.error("--rows must be at least the largest task count: each task needs a row")
    torch.set_num_threads(args.threads)
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "serving_tasks.json").write_text(json.dumps(result, indent=2))
    (out / "serving_tasks.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
