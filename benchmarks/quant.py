"""Tied adapters on quantized bases: what each base costs and what merging into it loses, against a bfloat16 base.

    python benchmarks/quant.py [--reps 7] [--batch 4] [--seq 64] [--rank 8] [--threads 1] [--tiny]
                               [--out benchmarks/results] [--name quant]

Model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized; the LLM kit's cached folder), or with ``--tiny`` a 2-layer
random Llama (a smoke test). Bases, each loaded with ``from_pretrained(..., dtype=bfloat16)`` and a transformers
quantization config: ``bf16`` (none; the reference), ``nf4`` (bitsandbytes 4-bit, bfloat16 compute), ``int8``
(bitsandbytes 8-bit), ``torchao-int8`` (torchao int8 weight-only). Adapter: ``tl6`` at ``--rank`` on q/k/v,
float32 factors. Per base:

- **base bytes**: the bytes of the model's state (quantized weights with their scales, deduplicated storages);
- **train step / bf16**: one AdamW step (forward, backward to the factors, update) on ``--batch`` x ``--seq``
  random tokens, alternated over the bases inside each of ``--reps`` repetitions after a warm-up; the ratio to the
  bf16 base's step in the same repetition, min / median / max (CPU time of the process, one thread);
- **adapter bytes**: the size of ``adapter.safetensors`` (the same on every base: the factors are float32);
- **merge**: factors set to a fixed random update (A, B as initialised, u = 1, v random, seed 1) scaled so that the
  update's size ``||dW|| / ||W||`` (median over sites) is 0.1 %, 1 % or 10 %; then ``merge_(dequantize=True)`` and
  ``unmerge_(dequantize=True)``: the re-encoding error of the merged weight relative to the update
  (``||Q(W + dW) - (W + dW)|| / ||dW||``, median over sites), the change of the logits by merging relative to the
  update's own effect on them (Frobenius norms over the batch's logits), and the base weight after the round trip (``||W' - W|| / ||W||``); a plot of the
  logit change against the update's size (``<name>.png``);
- **memory of a training step** for tying tl6, tying lora and PEFT LoRA (same targets, rank, float32 adapter):
  bytes autograd saves for backward plus the trainable state (float32 parameter, gradient, two AdamW moments).

Writes ``<out>/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import alternate, saved_bytes, spread

import tying
from tying.engine import wrappers

BASES = ["bf16", "nf4", "int8", "torchao-int8"]
UPDATE_SIZES = [0.001, 0.01, 0.1]  # ||dW|| / ||W||
MEMORY = ["tying-tl6", "tying-lora", "peft-lora"]


def tiny_folder(root: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "tiny")
    return root / "tiny"


def load(folder: Path, base: str):
    import transformers
    from tying.integrations.quant import config

    kwargs = {} if base == "bf16" else {"quantization_config": config(base, compute_dtype=torch.bfloat16)}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu",
                                                              **kwargs)
    return model.train()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.shape) if not hasattr(t, "__tensor_flatten__") else id(t)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def adapted(folder: Path, base: str, adapter: str, rank: int):
    model = load(folder, base)
    if adapter == "peft-lora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                          target_modules=["q_proj", "k_proj", "v_proj"]))
    tying.apply_(model, tying.load_spec(adapter.removeprefix("tying-"), rank=rank), dtype=torch.float32)
    zero_start = "v" if "v" in model.tying_bank else "B"  # the factor that starts at zero (tl6: v; lora: B)
    with torch.no_grad():  # a fixed non-zero update (see the module docstring)
        for t in model.tying_bank[zero_start].values():
            torch.nn.init.normal_(t, std=0.02, generator=torch.Generator().manual_seed(1))
    return model


def train_step(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def merge_errors(model, ids, base_logits, size: float) -> dict:
    """Re-encoding error of merging and unmerging an update of relative size ``size`` into the base weights."""
    sites = [w for _, w in wrappers(model)]
    with torch.no_grad():
        W = [w.mtype.weight(w.base).float().clone() for w in sites]
        now = statistics.median((w.delta().float().norm() / m.norm()).item() for w, m in zip(sites, W))
        for v in model.tying_bank["v"].values():  # dW is linear in v: scale it to the wanted size
            v.mul_(size / now)
        dW = [w.delta().float() for w in sites]
        unmerged = model(input_ids=ids).logits.float()
        tying.merge_(model, dequantize=True)
        merged_w = [w.mtype.weight(w.base).float() for w in sites]
        merged = model(input_ids=ids).logits.float()
        tying.unmerge_(model, dequantize=True)
        back_w = [w.mtype.weight(w.base).float() for w in sites]
    effect = (unmerged - base_logits).norm().item()
    return {
        "update_rel_norm": statistics.median((d.norm() / w.norm()).item() for d, w in zip(dW, W)),
        "merge_weight_error_vs_update": statistics.median(
            ((m - (w + d)).norm() / d.norm()).item() for m, w, d in zip(merged_w, W, dW)),
        "merge_logit_change_vs_update_effect": (merged - unmerged).norm().item() / effect,
        "update_logit_effect": effect,
        "unmerge_weight_error": statistics.median(((b - w).norm() / w.norm()).item() for b, w in zip(back_w, W)),
    }


def bench(folder: Path, args) -> dict:
    vocab = load(folder, "bf16").config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    res = {"bases": {}, "memory": {}}
    steps, models = {}, {}
    for base in BASES:
        plain = load(folder, base)
        with torch.no_grad():
            base_logits = plain.eval()(input_ids=ids).logits.float()
        row = res["bases"][base] = {"base_bytes": state_bytes(plain)}
        del plain
        model = models[base] = adapted(folder, base, "tying-tl6", args.rank)
        with tempfile.TemporaryDirectory() as tmp:
            row["adapter_bytes"] = (tying.save_adapter(model, tmp) / "adapter.safetensors").stat().st_size
        row["merge"] = {str(size): merge_errors(adapted(folder, base, "tying-tl6", args.rank).eval(), ids, base_logits,
                                                size) for size in UPDATE_SIZES}
        steps[base] = train_step(model, ids)
    times = alternate(steps, args.reps, argparse.Namespace(device="cpu"))
    for base in BASES:
        r = res["bases"][base]
        r["step_seconds"] = spread(times[base])
        r["step_vs_bf16"] = spread([t / b for t, b in zip(times[base], times["bf16"])])
        r["bytes_vs_bf16"] = r["base_bytes"] / res["bases"]["bf16"]["base_bytes"]
    del models, steps
    for base in BASES:
        mem = res["memory"][base] = {}
        for name in MEMORY:
            try:
                model = adapted(folder, base, name, args.rank)
            except Exception as e:  # noqa: BLE001  a contender that does not support this base: say so in the table
                mem[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            _, saved = saved_bytes(lambda m=model: m(input_ids=ids, labels=ids).loss)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            mem[name] = {"saved_for_backward": saved, "trainable": trainable, "trainable_state": 16 * trainable}
        ref = mem.get("peft-lora", {})
        for row in mem.values():
            if "saved_for_backward" in row and "saved_for_backward" in ref:
                row["total_vs_peft"] = ((row["saved_for_backward"] + row["trainable_state"])
                                        / (ref["saved_for_backward"] + ref["trainable_state"]))
    return res


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f} to {s['max']:.{digits}f})"


def tables(res: dict, args) -> list[str]:
    mb = 1 / 2 ** 20
    lines = [(f"Machine: {platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}. "
              f"Model: {res['model']}; tl6 rank {args.rank} on q/k/v, float32 factors; batch {args.batch} x "
              f"{args.seq} tokens; {args.reps} alternated repetitions; median (min to max)."), "",
             "| base | base MiB | / bf16 | train step (s) | step / bf16 base | adapter KiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for base, r in res["bases"].items():
        lines.append(f"| {base} | {r['base_bytes'] * mb:.1f} | {r['bytes_vs_bf16']:.2f} | "
                     f"{r['step_seconds']['median']:.3f} | {fmt(r['step_vs_bf16'])} | {r['adapter_bytes'] / 1024:.1f} |")
    lines += ["", ("**Merging into the base** (`merge_(dequantize=True)` where quantized; a random tl6 update of the "
                   "given size ||dW|| / ||W||, median over the q/k/v sites)"), "",
              ("| base | update / W | merged weight: error / update | logits: merge's change / update's effect | "
               "after unmerge: W error / W |"), "|---|---:|---:|---:|---:|"]
    for base, r in res["bases"].items():
        for m in r["merge"].values():
            lines.append(f"| {base} | {m['update_rel_norm']:.3f} | {m['merge_weight_error_vs_update']:.3f} | "
                         f"{m['merge_logit_change_vs_update_effect']:.3f} | {m['unmerge_weight_error']:.4f} |")
    lines += ["", ("**Memory of a training step** (bytes saved for backward + float32 parameter, gradient and two "
                   "AdamW moments of the trainable parameters)"), "",
              "| base | contender | trainable | saved for backward (MiB) | total (MiB) | total / PEFT LoRA's |",
              "|---|---|---:|---:|---:|---:|"]
    for base, mem in res["memory"].items():
        for name, r in mem.items():
            if "error" in r:
                lines.append(f"| {base} | {name} | | | not supported: {r['error'][:80]} | |")
                continue
            total = (r["saved_for_backward"] + r["trainable_state"]) * mb
            lines.append(f"| {base} | {name} | {r['trainable']:,} | {r['saved_for_backward'] * mb:.1f} | {total:.1f} "
                         f"| {r.get('total_vs_peft', float('nan')):.3f} |")
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for base, r in res["bases"].items():
        pts = sorted((m["update_rel_norm"], m["merge_logit_change_vs_update_effect"]) for m in r["merge"].values())
        ax.plot(*zip(*pts), marker="o", label=base)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="update size ||dW|| / ||W||",
           ylabel="logit change by merging / update's effect", title="Merging an update into each base")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of SmolLM2-135M (smoke test)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="quant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            folder, model_name = tiny_folder(Path(tmp)), "tiny random Llama (2 layers, width 64)"
        else:
            from tying.integrations.llm.fetch import cache_dir
            from tying.integrations.llm.models import load_smollm2
            from tying.integrations.llm.smollm import DESCRIPTION, MODEL_DIR

            load_smollm2()  # fetches and caches the folder on first use
            folder, model_name = cache_dir() / "models" / MODEL_DIR, DESCRIPTION
        res = bench(folder, args)
    res["model"] = model_name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{args.name}.md").write_text("\n".join(tables(res, args)) + "\n")
    plot(res, out / f"{args.name}.png")
    print("\n".join(tables(res, args)))
    return res


if __name__ == "__main__":
    main()
