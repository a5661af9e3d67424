"""Speed and memory of tying against PEFT LoRA at equal configuration, in one process.

    python benchmarks/speed.py [--reps 7] [--batch 2] [--seq 128] [--out benchmarks/results]

Models: a SmolLM2-135M-shaped Llama and a GPT-2-small-shaped model, random weights, float32, CPU.
Targets: the attention QKV projections (q/k/v, or GPT-2's fused c_attn), rank 8, alpha 8, no dropout.
Contenders are alternated inside every repetition after a warm-up; each figure is a median.

- train step (forward, backward, AdamW step): tying `lora-untied` (one A per module, exactly PEFT's
  LoRA), tying `lora` (A shared by q, k, v: the paper's fused-QKV LoRA), tying `tl6`, PEFT LoRA.
  Memory: bytes saved for backward (saved-tensor hooks, unique storages) plus trainable state
  (parameter, gradient, two AdamW moments).
- inference forward: base model, tying tl6 unmerged, tying tl6 merged.
- apply time on the LLaMA-2 7B meta-device model: tying.apply_ against peft.get_peft_model.
- adapter file size on the LLaMA-2 7B shape at rank 8: tying tl6 and lora, and tl6 exported to PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tying
from tying.models import REGISTRY, meta_model

QKV = {"smollm2-135m": ["q_proj", "k_proj", "v_proj"], "gpt2": ["c_attn"]}


def build(name: str):
    import transformers

    model_type, kwargs = REGISTRY[name]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kwargs))


def untied_lora(rank: int):
    spec = tying.load_spec("lora", rank=rank).model_dump()
    spec["adapter"]["factors"]["A"]["tie"] = []
    return tying.load_spec(spec)


def contender(name: str, model_name: str, rank: int):
    model = build(model_name)
    if name == "peft-lora":
        import peft

        cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=QKV[model_name],
                              fan_in_fan_out=model_name == "gpt2")
        return peft.get_peft_model(model, cfg)
    spec = untied_lora(rank) if name == "tying-lora-untied" else tying.load_spec(name.removeprefix("tying-"), rank=rank)
    tying.apply_(model, spec)
    return model


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while running fn()."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def train_bench(model_name: str, args) -> dict:
    names = ["tying-lora-untied", "tying-lora", "tying-tl6", "peft-lora"]
    models = {n: contender(n, model_name, args.rank).train() for n in names}
    vocab = REGISTRY[model_name][1].get("vocab_size", 50257)
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}
    times, mem = {n: [] for n in names}, {}

    def step(n):
        m = models[n]
        out, saved = saved_bytes(lambda: m(input_ids=batch, labels=batch).loss)
        out.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)
        return saved

    for n in names:  # warm-up
        step(n)
    for _ in range(args.reps):
        for n in names:
            t = time.perf_counter()
            saved = step(n)
            times[n].append(time.perf_counter() - t)
            trainable = sum(p.numel() for p in models[n].parameters() if p.requires_grad)
            mem[n] = {"saved_for_backward": saved, "trainable_state": 4 * 4 * trainable, "trainable": trainable}
    base = statistics.median(times["peft-lora"])
    return {n: {"step_s": statistics.median(times[n]), "ratio_vs_peft": statistics.median(times[n]) / base,
                "memory_bytes": mem[n]["saved_for_backward"] + mem[n]["trainable_state"],
                "memory_ratio_vs_peft": (mem[n]["saved_for_backward"] + mem[n]["trainable_state"]) /
                (mem["peft-lora"]["saved_for_backward"] + mem["peft-lora"]["trainable_state"]),
                "trainable": mem[n]["trainable"]} for n in names}


def inference_bench(model_name: str, args) -> dict:
    base = build(model_name).eval()
    adapted = contender("tying-tl6", model_name, args.rank).eval()
    merged = contender("tying-tl6", model_name, args.rank).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (adapted, merged):
            for p in m.tying_bank.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    tying.merge_(merged)
    vocab = REGISTRY[model_name][1].get("vocab_size", 50257)
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    runs = {"base": base, "tl6-unmerged": adapted, "tl6-merged": merged}
    times = {n: [] for n in runs}
    with torch.inference_mode():
        for m in runs.values():
            m(x)
        for _ in range(args.reps * 2):
            for n, m in runs.items():
                t = time.perf_counter()
                m(x)
                times[n].append(time.perf_counter() - t)
    b = statistics.median(times["base"])
    return {n: {"forward_s": statistics.median(t), "ratio_vs_base": statistics.median(t) / b} for n, t in times.items()}


def apply_bench(args) -> dict:
    import peft

    times = {"tying.apply_": [], "peft.get_peft_model": []}
    for _ in range(args.reps):
        m = meta_model("llama2-7b")
        t = time.perf_counter()
        tying.apply_(m, untied_lora(8))
        times["tying.apply_"].append(time.perf_counter() - t)
        m = meta_model("llama2-7b")
        t = time.perf_counter()
        peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=8, target_modules=QKV["smollm2-135m"]))
        times["peft.get_peft_model"].append(time.perf_counter() - t)
    base = statistics.median(times["peft.get_peft_model"])
    return {n: {"seconds": statistics.median(t), "ratio_vs_peft": statistics.median(t) / base} for n, t in times.items()}


def size_bench() -> dict:
    from tying.integrations.peft import export_peft

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for preset in ("lora", "tl6"):
            m = meta_model("llama2-7b")
            tying.apply_(m, tying.load_spec(preset, rank=8), device="cpu")  # only the bank is allocated
            tying.save_adapter(m, Path(d) / preset)
            out[f"tying {preset}"] = os.path.getsize(Path(d) / preset / "adapter.safetensors")
            if preset == "tl6":
                export_peft(m, Path(d) / "peft")
                out["tl6 exported to PEFT"] = os.path.getsize(Path(d) / "peft" / "adapter_model.safetensors")
    out["ratio tl6 / lora"] = out["tying tl6"] / out["tying lora"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "settings": vars(args)}
    for model_name in QKV:
        print(f"train + inference: {model_name}", flush=True)
        res[f"train {model_name}"] = train_bench(model_name, args)
        res[f"inference {model_name}"] = inference_bench(model_name, args)
    print("apply on LLaMA-2 7B (meta)", flush=True)
    res["apply llama2-7b meta"] = apply_bench(args)
    res["adapter file bytes llama2-7b r8"] = size_bench()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(res, indent=1))
    lines = [f"Machine: {res['machine']}. Batch {args.batch} x {args.seq} tokens, rank {args.rank}, float32, "
             f"median of {args.reps} alternated repetitions.", ""]
    for model_name in QKV:
        lines += [f"**Training step, {model_name}-shaped (random weights)**", "",
                  "| contender | trainable | step (s) | time vs PEFT | memory vs PEFT |", "|---|---|---|---|---|"]
        for n, r in res[f"train {model_name}"].items():
            lines.append(f"| {n} | {r['trainable']:,} | {r['step_s']:.3f} | {r['ratio_vs_peft']:.3f}x | "
                         f"{r['memory_ratio_vs_peft']:.3f}x |")
        lines += ["", f"**Inference forward, {model_name}-shaped**", "", "| model | forward (s) | vs base |", "|---|---|---|"]
        lines += [f"| {n} | {r['forward_s']:.3f} | {r['ratio_vs_base']:.3f}x |" for n, r in res[f"inference {model_name}"].items()]
        lines.append("")
    lines += ["**Apply LoRA (q, k, v; rank 8) to the LLaMA-2 7B meta-device model**", "", "| call | seconds | vs PEFT |",
              "|---|---|---|"]
    lines += [f"| {n} | {r['seconds']:.4f} | {r['ratio_vs_peft']:.3f}x |" for n, r in res["apply llama2-7b meta"].items()]
    sizes = res["adapter file bytes llama2-7b r8"]
    lines += ["", "**Adapter file on the LLaMA-2 7B shape, rank 8**", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {n} | {v:,} |" if isinstance(v, int) else f"| {n} | {v:.4f} |" for n, v in sizes.items()]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
