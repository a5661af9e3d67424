"""Many adapters on one base model, one mixed batch: tying's serving path against PEFT's ``adapter_names``.

    python benchmarks/serving.py [--presets tl6 lora vera] [--quick] [--reps 7] [--threads 1]
                                 [--counts 1 8 64 256] [--seq 128] [--prompt 16] [--new-tokens 32]
                                 [--out benchmarks/results/serving]

Model: a SmolLM2-135M-shaped Llama (30 layers, d 576, 9 heads / 3 KV heads, vocab 49,152), random weights
(seed 0), float32, CPU. Adapters: rank 8 on q/k/v, random trained factors (seeded per adapter), frozen
factors at the preset's seeded init (so VeRA-like adapters share A and B, as trained ones would); written
as adapter folders and loaded with ``tying.load_adapters_``. PEFT gets the same adapters through
``tying.integrations.peft.export_peft`` (one lora_A, lora_B per module) and serves mixed batches with
``adapter_names``.

- Resident memory per adapter with 1, 8, 64 and 256 adapters loaded: tying counts the tensors its serving
  bank holds (stacked factors and index tables, ``tying.serving.resident_bytes``); PEFT the lora_A / lora_B
  weights it holds (loaded up to ``--peft-max`` adapters; each PEFT adapter holds its own tensors).
- Tokens/s with all adapters loaded (tying: the largest count; PEFT: 16): a forward pass of 16 rows x
  ``--seq`` tokens (``logits_to_keep=1``, inference mode) and greedy generation of ``--new-tokens`` tokens
  from ``--prompt``-token prompts with the KV cache, for a batch on one adapter (``tying-1``) and a batch of 16 distinct adapters
  (``tying-16``, ``peft-16``); generation also runs the plain base model (``base``: the same model outside
  an ``adapters`` block) for scale. Contenders alternate inside every repetition; ratios are per
  repetition, min / median / max over the repetitions.

Each preset writes ``<out>/<preset>.json``; ``<out>/serving.md`` is rebuilt from every JSON there, so the
presets may run as separate commands. At the default (the issue's) shape one preset takes about 9 minutes
on one idle core of a 2-core x86 CPU, so run one preset per command; ``--quick`` (CI size) takes a few.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tying.integrations.meta_models import REGISTRY
from tying.integrations.peft import export_peft

import tying
from tying.bank import FactorBank
from tying.serving import resident_bytes
from tying.state import SPEC_FILE, WEIGHTS_FILE

MODEL = "SmolLM2-135M-shaped Llama (random weights, seed 0), float32"


def build_model():
    import transformers

    model_type, kwargs = REGISTRY["smollm2-135m"]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def write_adapters(model, preset: str, rank: int, names: list[str], out: Path) -> dict[str, Path]:
    """Adapter folders for ``names``: trained factors random (seed = index), frozen ones at their init."""
    spec = tying.load_spec(preset, rank=rank)
    plan = tying.plan(model, spec)
    init = {k: v.detach() for k, v in FactorBank(plan).state_dict().items()}
    trained = {f"{g.factor}.{g.key}" for g in plan.groups if g.train}
    folders = {}
    for name in names:
        g = torch.Generator().manual_seed(int(name[1:]))
        tensors = {k: (torch.randn(v.shape, generator=g) * 0.05 if k in trained else v).contiguous()
                   for k, v in init.items()}
        folder = folders[name] = out / name
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / WEIGHTS_FILE))
        (folder / SPEC_FILE).write_text(spec.to_yaml())
    return folders


def peft_bytes(peft_model) -> int:
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if ".lora_" in n)


def time_one(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_preset(preset: str, args) -> dict:
    from peft import PeftModel

    counts = sorted(set(args.counts))
    rows, seq, prompt, new = 16, args.seq, args.prompt, args.new_tokens
    names = [f"a{i}" for i in range(max(counts))]
    tmp = Path(tempfile.mkdtemp(prefix=f"serving-{preset}-"))
    model = build_model()
    folders = write_adapters(model, preset, args.rank, names, tmp / "tying")
    memory, loaded = [], 0
    for n in counts:
        batch = {k: folders[k] for k in names[loaded:n]}
        t = time_one(lambda batch=batch: tying.load_adapters_(model, batch))
        loaded = n
        memory.append({"adapters": n, "tying_bytes_per_adapter": resident_bytes(model) / n, "load_s": t})
        print(f"{preset}: {n} adapters loaded, {resident_bytes(model) / n:,.0f} bytes each ({t:.1f} s)", flush=True)
    peft_n = min(max(counts), args.peft_max)
    base = build_model()
    peft_dirs = [export_peft(base, tmp / "peft" / k, adapter=folders[k]) for k in names[:peft_n]]
    peft = PeftModel.from_pretrained(base, str(peft_dirs[0]), adapter_name=names[0]).eval()
    memory[0]["peft_bytes_per_adapter"] = peft_bytes(peft)
    for n in range(1, peft_n):
        peft.load_adapter(str(peft_dirs[n]), adapter_name=names[n])
        if n + 1 in counts:
            next(m for m in memory if m["adapters"] == n + 1)["peft_bytes_per_adapter"] = peft_bytes(peft) / (n + 1)
    distinct = names[:rows] if peft_n >= rows else [names[i % peft_n] for i in range(rows)]
    one = [names[0]] * rows
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=g)
    prompts = torch.randint(0, model.config.vocab_size, (rows, prompt), generator=g)
    gen = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}

    def tying_forward(batch):
        with tying.adapters(model, batch):
            model(ids, logits_to_keep=1)

    def tying_generate(batch):
        with tying.adapters(model, batch):
            model.generate(prompts, **gen)

    contenders = {
        "forward": {"tying-1": lambda: tying_forward(one), "tying-16": lambda: tying_forward(distinct),
                    "peft-16": lambda: peft(input_ids=ids, adapter_names=distinct, logits_to_keep=1)},
        "generate": {"tying-1": lambda: tying_generate(one), "tying-16": lambda: tying_generate(distinct),
                     "peft-16": lambda: peft.generate(input_ids=prompts, adapter_names=distinct, **gen),
                     "base": lambda: model.generate(prompts, **gen)},  # outside a block: the plain base model
    }
    tokens = {"forward": rows * seq, "generate": rows * new}
    speed = {}
    with torch.inference_mode():
        for task, fns in contenders.items():
            for fn in fns.values():  # warm-up
                fn()
            per_rep = {k: [] for k in fns}
            for rep in range(args.reps):
                order = list(fns) if rep % 2 == 0 else list(reversed(fns))
                for k in order:
                    per_rep[k].append(tokens[task] / time_one(fns[k]))
                print(f"{preset} {task} rep {rep}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in per_rep.items()),
                      flush=True)
            ratios = {"tying-16 / tying-1": [a / b for a, b in zip(per_rep["tying-16"], per_rep["tying-1"])],
                      "tying-16 / peft-16": [a / b for a, b in zip(per_rep["tying-16"], per_rep["peft-16"])]}
            speed[task] = {"tokens_per_s": {k: summary(v) for k, v in per_rep.items()},
                           "ratios": {k: summary(v) for k, v in ratios.items()}}
    return {"preset": preset, "rank": args.rank, "model": MODEL, "quick": args.quick,
            "data": "random token ids (seed 0)", "loaded_for_timing": {"tying": max(counts), "peft": peft_n},
            "shape": {"rows": rows, "forward_tokens": seq, "prompt_tokens": prompt, "new_tokens": new},
            "reps": args.reps, "threads": args.threads, "memory": memory, "speed": speed, "machine": machine()}


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def machine() -> str:
    cores = len(__import__("os").sched_getaffinity(0))
    return f"{platform.machine()} CPU, {cores} cores, no GPU, torch {torch.__version__}"


def table(results: list[dict]) -> str:
    """The markdown page: memory per adapter, then tokens/s and ratios, from every preset's JSON."""
    if not results:
        return ""
    r0 = results[0]
    s = r0["shape"]
    lines = [(f"Model: {r0['model']}; rank {r0['rank']} on q/k/v; {r0['machine']}; {r0['threads']} thread(s); "
              f"{r0['reps']} alternated repetitions (min / median / max)."), "",
             "**Resident adapter memory per adapter (bytes)**", "",
             "| preset | adapters | tying | PEFT (export_peft) | PEFT / tying |", "|---|---|---|---|---|"]
    for r in results:
        for m in r["memory"]:
            p, t = m.get("peft_bytes_per_adapter"), m["tying_bytes_per_adapter"]
            peft_cells = "| - | - |" if p is None else f"| {p:,.0f} | {p / t:.1f}x |"
            lines.append(f"| {r['preset']} | {m['adapters']} | {t:,.0f} {peft_cells}")
    lora = next((r for r in results if r["preset"] == "lora"), None)
    tl6 = next((r for r in results if r["preset"] == "tl6"), None)
    if lora and tl6:
        ratio = lora["memory"][0]["peft_bytes_per_adapter"] / tl6["memory"][-1]["tying_bytes_per_adapter"]
        lines += ["", (f"PEFT LoRA per adapter / tying TL6 per adapter ({tl6['memory'][-1]['adapters']} loaded): "
                       f"**{ratio:.1f}x** (goal: at least 7x).")]
    for task, what in (("forward", f"forward, {s['rows']} rows x {s['forward_tokens']} tokens"),
                       ("generate", (f"generate {s['new_tokens']} tokens, {s['rows']} rows, "
                                     f"{s['prompt_tokens']}-token prompts, KV cache"))):
        lines += ["", (f"**Tokens/s, {what}** (tying with {r0['loaded_for_timing']['tying']} adapters loaded, "
                       f"PEFT with {r0['loaded_for_timing']['peft']})"), "",
                  "| preset | base | tying-1 | tying-16 | peft-16 | tying-16 / tying-1 | tying-16 / peft-16 |",
                  "|---|---|---|---|---|---|---|"]
        for r in results:
            sp = r["speed"][task]
            tok = [f"{sp['tokens_per_s'][k]['median']:.0f}" if k in sp["tokens_per_s"] else "-"
                   for k in ("base", "tying-1", "tying-16", "peft-16")]
            rat = [sp["ratios"][k] for k in ("tying-16 / tying-1", "tying-16 / peft-16")]
            lines.append(f"| {r['preset']} | {' | '.join(tok)} | "
                         + " | ".join(f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})" for x in rat) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tl6", "lora", "vera"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="CI size: 1 and 16 adapters, 16 x 32-token forward, "
                    "8 new tokens from 8-token prompts (overrides the four options below)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 8, 64, 256], help="adapters loaded (memory)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row of the forward batch")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row for generation")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peft-max", type=int, default=16, help="most adapters loaded into PEFT (at least 16)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving")
    args = ap.parse_args()
    if args.peft_max < 16:
        ap.error("--peft-max must be at least 16: the mixed batch has 16 distinct adapters")
    if args.quick:
        args.counts, args.seq, args.prompt, args.new_tokens = [1, 16], 32, 8, 8
    if max(args.counts) < 16:
        ap.error("--counts needs a count of at least 16: the mixed batch has 16 distinct adapters")
    torch.set_num_threads(args.threads)
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        result = run_preset(preset, args)
        (out / f"{preset}.json").write_text(json.dumps(result, indent=2))
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    order = {"tl6": 0, "lora": 1, "vera": 2}
    results.sort(key=lambda r: order.get(r["preset"], 9))
    (out / "serving.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
