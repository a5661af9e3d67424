"""The adapter's overhead over the frozen base, against PEFT LoRA at equal configuration, in one process.

    python benchmarks/speed.py [--reps 7] [--threads 1] [--dtype float32 bfloat16] [--device cpu|cuda]
                               [--compile] [--profile] [--tiny] [--out benchmarks/results]

Models: a SmolLM2-135M-shaped Llama and a GPT-2-small-shaped model, random weights (seed 0), batch
2 x 128 tokens. Targets: the attention QKV projections (q/k/v, or GPT-2's fused c_attn), rank 8,
alpha 8, no dropout. ``--dtype bfloat16`` runs a bfloat16 base with float32 factors for every
contender (PEFT keeps its adapter weights in float32 too, its default).

- **floor**: the frozen model with no adapter, forward and backward down to the input embeddings.
  Every contender gets the same input embeddings with ``requires_grad``, so the floor does exactly
  the base model's work of each contender's step and the difference is the adapter's own cost.
- train step (forward, backward, AdamW step): PEFT LoRA, tying ``lora-untied`` (one A per module,
  exactly PEFT's LoRA), tying ``lora`` (A shared by q, k, v: the paper's fused-QKV LoRA), tying ``tl6``;
  with ``--compile`` also the floor and TL6 under ``torch.compile(fullgraph=True)`` (inductor).
- inference forward (``torch.inference_mode``): base model, PEFT LoRA, tying lora and TL6 unmerged, TL6 merged.

Contenders are alternated inside every repetition after a warm-up. Times are the process's CPU time on
a CPU (with one thread, time lost to other processes does not count) and wall time on CUDA. Per repetition, a contender's
overhead is its time minus the floor's time in that repetition, and its ratio is that overhead over
PEFT's overhead in the same repetition; the tables give min / median / max over the repetitions.
Memory (bytes saved for backward plus trainable state) is measured in a separate, untimed step.
Also: apply time on the LLaMA-2 7B meta-device model, and adapter file sizes on that shape.
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
from torch import nn
from tying.integrations.meta_models import REGISTRY, meta_model

import tying
from tying.engine import wrappers

QKV = {"smollm2-135m": ["q_proj", "k_proj", "v_proj"], "gpt2": ["c_attn"]}
TINY = {"smollm2-135m": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "intermediate_size": 128, "vocab_size": 256},
        "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256}}
TRAIN = ["peft-lora", "tying-lora-untied", "tying-lora", "tying-lora-per-site", "tying-tl6", "tying-tl6-per-site"]
INFER = ["peft-lora", "tying-lora", "tying-tl6", "tying-tl6-per-site", "tying-tl6-merged"]


def build(name: str, args):
    import transformers

    model_type, kwargs = REGISTRY[name]
    kwargs = {**kwargs, **(TINY[name] if args.tiny else {})}
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.loss_type = "ForCausalLM"  # else GPT-2 logs a warning from its loss: a graph break for torch.compile
    model.requires_grad_(False)
    return model.to(device=args.device, dtype=args.dtype_)


def untied_lora(rank: int):
    spec = tying.load_spec("lora", rank=rank).model_dump()
    spec["adapter"]["factors"]["A"]["tie"] = []
    return tying.load_spec(spec)


class Projections(nn.Module):
    """One layer's adapted modules alone (q, k, v or GPT-2's c_attn) at the model's shape, named as in the
    model (``layers.0.self_attn.q_proj``) so that the presets and PEFT select them the same way."""

    def __init__(self, model_name: str, args):
        from transformers.pytorch_utils import Conv1D

        cfg = {**REGISTRY[model_name][1], **(TINY[model_name] if args.tiny else {})}
        torch.manual_seed(0)
        if model_name == "gpt2":
            d = cfg.get("n_embd", 768)
            mods = {"c_attn": Conv1D(3 * d, d)}
        else:
            d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
            kv = d // heads * cfg.get("num_key_value_heads", heads)
            mods = {"q_proj": nn.Linear(d, d, bias=False), "k_proj": nn.Linear(d, kv, bias=False),
                    "v_proj": nn.Linear(d, kv, bias=False)}
        super().__init__()
        self.d_in, self.layers = d, nn.ModuleList([nn.Module()])
        self.layers[0].self_attn = nn.ModuleDict(mods)
        self.layers_of_model = cfg.get("n_layer", cfg.get("num_hidden_layers", 12))
        self.requires_grad_(False).to(device=args.device, dtype=args.dtype_)

    def forward(self, x):
        return [m(x) for m in self.layers[0].self_attn.values()]


def contender(name: str, model_name: str, args, make=None):
    """A fresh model (``make``, default: the whole model) with the contender's adapter; factors (and PEFT's
    adapter weights) in float32."""
    model = (make or build)(model_name, args)
    if name == "floor":
        return model
    if name == "peft-lora":
        import peft

        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=QKV[model_name],
                              fan_in_fan_out=model_name == "gpt2")
        return peft.get_peft_model(model, cfg)  # autocast_adapter_dtype=True: float32 adapter on a bf16 base
    preset = name.removeprefix("tying-").removesuffix("-merged").removesuffix("-per-site")
    spec = untied_lora(args.rank) if preset == "lora-untied" else tying.load_spec(preset, rank=args.rank)
    tying.apply_(model, spec, dtype=torch.float32)
    with torch.no_grad():  # non-zero factors: a merged or unmerged update that does real arithmetic
        g = torch.Generator().manual_seed(1)
        for p in model.tying_bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    if name.endswith("-merged"):
        tying.merge_(model)
    if name.endswith("-per-site"):  # ablation: every site computes its own A x (no shared down projection)
        for _, w in wrappers(model):
            w.share = None
    return model


def saved_bytes(fn):
    """fn() and the bytes of the unique storages autograd saves for backward while running it."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def spread(xs) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "ci95": median_interval(xs)}


def median_interval(xs, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median over repetitions (seeded: the same numbers give the same interval)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(xs, dtype=torch.float64)
    meds = t[torch.randint(0, len(xs), (n, len(xs)), generator=gen)].median(dim=1).values
    return float(meds.quantile(0.025)), float(meds.quantile(0.975))


def clock(args) -> float:
    """CPU: the process's CPU time (with one thread, time lost to other processes on a shared machine does
    not count); CUDA: wall time after a synchronize."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def alternate(fns: dict, reps: int, args, inner: int = 1) -> dict:
    """Times of each fn, alternated inside every repetition, after one warm-up call each; with ``inner`` > 1
    a repetition's time is the least of ``inner`` consecutive calls (a call that another process disturbed
    takes longer, never shorter)."""
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            best = float("inf")
            for _ in range(inner):
                t = clock(args)
                f()
                best = min(best, clock(args) - t)
            times[n].append(best)
    return times


def overheads(times: dict, floor: str, ref: str) -> dict:
    """Per contender: time, overhead over the floor and ratio to ref's overhead, paired per repetition."""
    out = {}
    for n, t in times.items():
        row = {"seconds": spread(t)}
        if n != floor:
            ovh = [a - b for a, b in zip(t, times[floor])]
            row["overhead_s"] = spread(ovh)
            row["overhead_pct"] = 100 * statistics.median(ovh) / statistics.median(times[floor])
            row["overhead_vs_peft"] = spread([o / (r - f) for o, r, f in zip(ovh, times[ref], times[floor])])
            row["time_vs_peft"] = spread([a / b for a, b in zip(t, times[ref])])
        out[n] = row
    return out


def train_bench(model_name: str, args) -> dict:
    names = ["floor", *(n for n in TRAIN if not n.endswith("-per-site"))]  # ablations: block_bench only
    models = {n: contender(n, model_name, args).train() for n in names}
    if args.compile:
        models["floor-compiled"] = torch.compile(contender("floor", model_name, args).train(), fullgraph=True)
        models["tying-tl6-compiled"] = torch.compile(contender("tying-tl6", model_name, args).train(), fullgraph=True)
    vocab = models["floor"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    embeds = models["floor"].get_input_embeddings()(ids).detach()
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for n, m in models.items() if not n.startswith("floor")}

    def step(n):
        x = embeds.detach().requires_grad_()  # gradients flow down to the embeddings, as in the floor
        models[n](inputs_embeds=x, labels=ids).loss.backward()
        if n in opts:
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)

    mem = {}
    for n, m in models.items():
        if n.endswith("-compiled"):  # saved-tensor hooks are not for compiled graphs: see the eager twin
            continue
        _, saved = saved_bytes(lambda m=m: m(inputs_embeds=embeds.detach().requires_grad_(), labels=ids).loss)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        mem[n] = {"saved_for_backward": saved, "trainable": trainable,
                  "trainable_state": 4 * 4 * trainable}  # float32 parameter, gradient, two AdamW moments
    times = alternate({n: (lambda n=n: step(n)) for n in models}, args.reps, args)
    res = overheads(times, "floor", "peft-lora")
    if args.compile:  # the compiled TL6 is measured against the compiled floor
        comp = overheads({"floor": times["floor-compiled"], "tl6": times["tying-tl6-compiled"],
                          "peft-lora": times["peft-lora"]}, "floor", "peft-lora")["tl6"]
        res["tying-tl6-compiled"].update({k: comp[k] for k in ("overhead_s", "overhead_pct")})
        for k in ("overhead_s", "overhead_pct", "overhead_vs_peft"):  # the compiled floor is its own floor
            res["floor-compiled"].pop(k)
        res["tying-tl6-compiled"]["overhead_vs_peft"] = spread(
            [(c - f) / (p - e) for c, f, p, e in zip(times["tying-tl6-compiled"], times["floor-compiled"],
                                                     times["peft-lora"], times["floor"])])
    tokens = args.batch * args.seq
    for n, r in res.items():
        m = mem[n.removesuffix("-compiled")]
        r.update(m, tokens_per_s=tokens / r["seconds"]["median"])
        total = m["saved_for_backward"] + m["trainable_state"]
        r["memory_vs_peft"] = total / (mem["peft-lora"]["saved_for_backward"] + mem["peft-lora"]["trainable_state"])
    return res


def block_bench(model_name: str, args) -> dict:
    """The adapter's overhead on one layer's adapted modules alone (``Projections``), where the floor is
    their frozen forward and backward to the input: the same overhead as in the whole model, without the
    rest of the model's time and noise, so many more repetitions fit. Training: forward + backward, and
    separately the AdamW step (plus zero_grad) of the whole model's trainable factors; inference: forward."""
    names = ["floor", *TRAIN]
    models = {n: contender(n, model_name, args, make=Projections) for n in names}
    tokens, layers = args.batch * args.seq, models["floor"].layers_of_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, models["floor"].d_in, generator=g).to(args.device, args.dtype_)
    grads = [torch.randn(o.shape, generator=g).to(o) for o in models["floor"](x)]

    def step(m):
        m.zero_grad(set_to_none=True)
        torch.autograd.backward(m(x.detach().requires_grad_()), grads)

    times = alternate({n: (lambda m=m: step(m)) for n, m in models.items()}, args.block_reps, args, args.inner)
    res = {"train": overheads(times, "floor", "peft-lora")}
    inf = {n: models[n] if n in models else contender(n, model_name, args, make=Projections) for n in ["floor", *INFER]}
    with torch.inference_mode():
        res["inference"] = overheads(alternate({n: (lambda m=m: m(x)) for n, m in inf.items()}, args.block_reps, args,
                                               args.inner),
                                     "floor", "peft-lora")
    res["optimizer"] = optimizer_bench(model_name, args)
    for n, r in res["train"].items():  # the whole model's overhead, composed: layers x block + optimizer step
        if "overhead_s" in r:
            r["composed_overhead_s"] = layers * r["overhead_s"]["median"] + res["optimizer"][n]["seconds"]["median"]
    for n, r in res["train"].items():
        if "overhead_s" in r:
            r["composed_vs_peft"] = r["composed_overhead_s"] / res["train"]["peft-lora"]["composed_overhead_s"]
    res["layers"] = layers
    return res


def optimizer_bench(model_name: str, args) -> dict:
    """AdamW step on tensors shaped like each contender's trainable parameters in the whole model."""
    shapes = {}
    for n in TRAIN:
        m = meta_model(model_name) if not args.tiny else build(model_name, args).to("meta")
        if n == "peft-lora":
            import peft

            m = peft.get_peft_model(m, peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=QKV[model_name],
                                                       fan_in_fan_out=model_name == "gpt2"))
        else:
            preset = n.removeprefix("tying-").removesuffix("-per-site")
            tying.apply_(m, untied_lora(args.rank) if preset == "lora-untied" else tying.load_spec(preset, rank=args.rank))
        shapes[n] = [p.shape for p in m.parameters() if p.requires_grad]
    params = {n: [torch.zeros(s, device=args.device, requires_grad=True) for s in ss] for n, ss in shapes.items()}
    opts = {n: torch.optim.AdamW(ps, lr=1e-4) for n, ps in params.items()}
    for p in (p for ps in params.values() for p in ps):
        p.grad = torch.ones_like(p)  # allocating gradients is part of the backward, timed in block_bench
    times = alternate({n: opts[n].step for n in TRAIN}, args.block_reps, args, args.inner)
    return {n: {"seconds": spread(t), "tensors": len(params[n])} for n, t in times.items()}


def inference_bench(model_name: str, args) -> dict:
    models = {n: contender(n, model_name, args).eval() for n in ["floor", *INFER] if not n.endswith("-per-site")}
    vocab = models["floor"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    with torch.inference_mode():
        times = alternate({n: (lambda m=m: m(input_ids=ids)) for n, m in models.items()}, args.reps * 2, args)
    return overheads(times, "floor", "peft-lora")


def profile_adapter(model_name: str, args) -> list[dict]:
    """torch.profiler self-CPU time and call count per op: TL6 train step minus the floor's step."""
    from torch.profiler import ProfilerActivity, profile

    rows = {}
    for sign, name in ((1, "tying-tl6"), (-1, "floor")):
        m = contender(name, model_name, args).train()
        ids = torch.randint(0, m.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        embeds = m.get_input_embeddings()(ids.to(args.device)).detach()
        def run(m=m, embeds=embeds, ids=ids):
            m(inputs_embeds=embeds.detach().requires_grad_(), labels=ids.to(args.device)).loss.backward()

        run()
        best = None
        for _ in range(3):  # the least disturbed of three profiled steps
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            avg = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
            total = sum(t for t, _ in avg.values())
            if best is None or total < best[0]:
                best = (total, avg)
        for k, (t, c) in best[1].items():
            r = rows.setdefault(k, {"op": k, "self_cpu_ms": 0.0, "calls": 0})
            r["self_cpu_ms"] += sign * t / 1e3
            r["calls"] += sign * c
    return sorted((r for r in rows.values() if r["calls"] or abs(r["self_cpu_ms"]) > 0.5),
                  key=lambda r: -r["self_cpu_ms"])


def _layout_pairs(x, g_out, A, Bt, h) -> dict:
    """product: (torch's layout, tying's layout), computing the same values."""
    B, hT, gh = Bt.t().contiguous(), h.t().contiguous(), h.t().contiguous()
    return {
        "down: h = x A^T": (lambda: x @ A.t(), lambda: A @ x.t()),
        "up: out + h B^T": (lambda: torch.addmm(g_out, h, B.t()), lambda: torch.addmm(g_out, hT.t(), Bt)),
        "grad h = g B": (lambda: g_out @ B, lambda: Bt @ g_out.t()),
        "grad B = g^T h": (lambda: g_out.t() @ h, lambda: hT @ g_out),
        "grad A = g_h^T x": (lambda: h.t() @ x, lambda: gh @ x),
        "grad x = g_h A": (lambda: h @ A, lambda: gh.t() @ A),
    }


def layout_bench(args) -> dict:
    """Each rank-r product of a LoRA site (forward and backward) in torch's own layout (``F.linear`` and its
    autograd formulas) against the layout of tying's LowRankDown / LowRankUp (the long side last), at each
    model's q (or c_attn) shape. torch.utils.benchmark, median of blocked runs, microseconds."""
    import torch.utils.benchmark as tb

    out = {}
    for model_name in args.models:
        cfg = {**REGISTRY[model_name][1], **(TINY[model_name] if args.tiny else {})}
        d = cfg.get("hidden_size", cfg.get("n_embd", 768))
        d_out = d if model_name != "gpt2" else 3 * d
        t, r, g = args.batch * args.seq, args.rank, torch.Generator().manual_seed(0)
        x, g_out = (torch.randn(t, n, generator=g).to(args.device, args.dtype_) for n in (d, d_out))
        A, Bt, h = (torch.randn(*s, generator=g).to(args.device, args.dtype_) for s in ((r, d), (r, d_out), (t, r)))
        rows = {}
        for name, fns in _layout_pairs(x, g_out, A, Bt, h).items():
            us = [tb.Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.2).median * 1e6 for f in fns]
            rows[name] = {"torch_us": us[0], "tying_us": us[1], "speedup": us[0] / us[1]}
        out[f"{model_name} (tokens {t}, d_in {d}, d_out {d_out}, rank {r})"] = rows
    return out


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


def fmt(s: dict, unit: str = "", scale: float = 1.0, digits: int = 3, ci: bool = False) -> str:
    v = [s[k] * scale for k in ("median", "min", "max")]
    text = f"{v[0]:.{digits}f}{unit} ({v[1]:.{digits}f} to {v[2]:.{digits}f})"
    if ci:  # the median's 95 % interval over repetitions, what a goal is judged on
        text += f" [{s['ci95'][0] * scale:.{digits}f}, {s['ci95'][1] * scale:.{digits}f}]"
    return text


def block_table(shape: str, r: dict, args) -> list[str]:
    lines = [(f"**Adapter overhead, {shape}: one layer's adapted modules** (floor: their frozen forward + backward "
              f"to the input; {args.block_reps} repetitions, each the best of {args.inner} calls; whole model = "
              f"{r['layers']} layers x one layer + the AdamW step)"), "",
             ("| contender | train overhead / layer (ms) | / PEFT's | AdamW step (ms) | whole-model train overhead (ms) "
              "| / PEFT's | inference overhead / layer (ms) | / PEFT's |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, t in r["train"].items():
        if n == "floor":
            lines.append(f"| floor | {t['seconds']['median'] * 1e3:.2f} (time) | | | | | "
                         f"{r['inference']['floor']['seconds']['median'] * 1e3:.2f} (time) | |")
            continue
        i = r["inference"].get(n)
        inf = [fmt(i["overhead_s"], scale=1e3, digits=3), fmt(i["overhead_vs_peft"], "x", digits=2)] if i else ["", ""]
        lines.append(f"| {n} | {fmt(t['overhead_s'], scale=1e3, digits=3)} | {fmt(t['overhead_vs_peft'], 'x', digits=2)} | "
                     f"{r['optimizer'][n]['seconds']['median'] * 1e3:.2f} | {t['composed_overhead_s'] * 1e3:.1f} | "
                     f"{t['composed_vs_peft']:.2f}x | {' | '.join(inf)} |")
    for n, i in r["inference"].items():
        if n not in r["train"]:
            lines.append(f"| {n} | | | | | | {fmt(i['overhead_s'], scale=1e3, digits=3)} | "
                         f"{fmt(i['overhead_vs_peft'], 'x', digits=2)} |")
    return lines + [""]


def tables(res: dict, args) -> list[str]:
    if args.layouts_only:
        lines = [f"Machine: {res['machine']}; {args.threads} thread(s); torch.utils.benchmark medians."]
    else:
        lines = [f"Machine: {res['machine']}. Batch {args.batch} x {args.seq} tokens, rank {args.rank}, {args.threads} "
                 f"thread(s), {args.reps} alternated repetitions (inference: {2 * args.reps}); median (min to max), overhead / PEFT's "
                 f"also [the median's 95 % bootstrap interval over repetitions]; "
                 + ("wall time" if args.device.startswith("cuda") else "CPU time of the process") + ".", ""]
    for key, r in res.items():
        if key.startswith("block "):
            lines += block_table(key[6:], r, args)
            continue
        if key.startswith("train "):
            lines += [f"**Training step, {key[6:]}** (floor: frozen model, forward + backward to the embeddings)", "",
                      ("| contender | trainable | step (s) | tokens/s | overhead over floor (ms) | overhead % | "
                       "overhead / PEFT's | step / PEFT's | memory / PEFT's |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        elif key.startswith("inference "):
            lines += [f"**Inference forward, {key[10:]}** (floor: the base model)", "",
                      "| model | forward (s) | overhead over floor (ms) | overhead % | overhead / PEFT's |",
                      "|---|---:|---:|---:|---:|"]
        else:
            continue
        for n, row in r.items():
            ovh = [fmt(row["overhead_s"], scale=1e3, digits=1), f"{row['overhead_pct']:.1f}",
                   fmt(row["overhead_vs_peft"], "x", digits=2, ci=True)] if "overhead_s" in row else ["", "", ""]
            if key.startswith("train "):
                ratio = fmt(row["time_vs_peft"], "x") if "time_vs_peft" in row else ""
                mem = f"{row['memory_vs_peft']:.3f}x" if n != "floor" else ""
                lines.append(f"| {n} | {row['trainable']:,} | {row['seconds']['median']:.3f} | "
                             f"{row['tokens_per_s']:.0f} | {' | '.join(ovh)} | {ratio} | {mem} |")
            else:
                lines.append(f"| {n} | {row['seconds']['median']:.3f} | {' | '.join(ovh)} |")
        lines.append("")
    if "apply llama2-7b meta" in res:
        lines += ["**Apply LoRA (q, k, v; rank 8) to the LLaMA-2 7B meta-device model**", "",
                  "| call | seconds | vs PEFT |", "|---|---|---|"]
        lines += [f"| {n} | {r['seconds']:.4f} | {r['ratio_vs_peft']:.3f}x |" for n, r in res["apply llama2-7b meta"].items()]
        lines += ["", "**Adapter file on the LLaMA-2 7B shape, rank 8**", "", "| file | bytes |", "|---|---|"]
        lines += [f"| {n} | {v:,} |" if isinstance(v, int) else f"| {n} | {v:.4f} |"
                  for n, v in res["adapter file bytes llama2-7b r8"].items()]
    for key, rows in res.get("layouts", {}).items():
        lines += ["", f"**Rank-{args.rank} products, {key}, {args.dtype[0]}: torch's layout vs tying's (us)**", "",
                  "| product | torch (F.linear and its backward) | tying (LowRankDown / LowRankUp) | speed-up |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {n} | {r['torch_us']:.1f} | {r['tying_us']:.1f} | {r['speedup']:.2f}x |" for n, r in rows.items()]
    for key, rows in res.items():
        if key.startswith("profile "):
            lines += ["", f"**{key}: TL6 train step minus the floor's step, by op (torch.profiler self CPU time)**", "",
                      "| op | extra self CPU (ms) | extra calls |", "|---|---:|---:|"]
            lines += [f"| {r['op']} | {r['self_cpu_ms']:.1f} | {r['calls']} |" for r in rows[:args.profile_rows]]
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by other work)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="the base model's dtype (factors stay float32)")
    ap.add_argument("--models", nargs="+", default=list(QKV), choices=list(QKV))
    ap.add_argument("--compile", action="store_true", help="add torch.compile(fullgraph=True) rows (floor, TL6)")
    ap.add_argument("--block-reps", type=int, default=31, help="repetitions of the one-layer measurement")
    ap.add_argument("--inner", type=int, default=5, help="one-layer measurement: best of this many calls per repetition")
    ap.add_argument("--whole", action=argparse.BooleanOptionalAction, default=True,
                    help="also time whole-model steps (slow on a small CPU)")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler table of TL6's extra ops")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--no-extras", action="store_true", help="skip the apply-time and file-size tables")
    ap.add_argument("--layouts-only", action="store_true", help="only the table of GEMM layouts (first --dtype)")
    ap.add_argument("--tiny", action="store_true", help="2-layer, 64-wide models of the same shapes (smoke test)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="speed", help="output file stem")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                      + (f", {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""),
           "settings": vars(args).copy()}
    if args.layouts_only:
        args.dtype_ = getattr(torch, args.dtype[0])
        res["layouts"] = layout_bench(args)
    for dtype in ([] if args.layouts_only else args.dtype):
        args.dtype_ = getattr(torch, dtype)
        tag = "" if dtype == "float32" else ", bfloat16 base + float32 factors"
        for model_name in args.models:
            print(f"{model_name}{tag}", flush=True)
            res[f"block {model_name}-shaped{tag}"] = block_bench(model_name, args)
            if args.whole:
                res[f"train {model_name}-shaped{tag}"] = train_bench(model_name, args)
                res[f"inference {model_name}-shaped{tag}"] = inference_bench(model_name, args)
            if args.profile:
                res[f"profile {model_name}-shaped{tag}"] = profile_adapter(model_name, args)
    if not (args.no_extras or args.layouts_only):
        res["apply llama2-7b meta"] = apply_bench(args)
        res["adapter file bytes llama2-7b r8"] = size_bench()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
    lines = tables(res, args)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
