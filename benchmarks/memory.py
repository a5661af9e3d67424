"""Peak training memory, predicted (tying.integrations.memory) and measured, for tying and PEFT LoRA (issue 36.4).

    python benchmarks/memory.py [--runs all|NAME,...] [--rank 8] [--batch 1] [--seq 64]
                                [--out benchmarks/results/memory]

Each measurement runs in a process of its own (``--child``), on one thread: import every library, note the resident
memory (RSS), build a Llama-shaped model with random weights (bfloat16; or every decoder Linear a bitsandbytes nf4
layer, bfloat16 compute: the model is built on the meta device and filled module by module, so that no full-precision
copy of a 4-bit base ever exists), put the adapter on it (tying ``tl6`` with float32 factors, or PEFT LoRA on q/k/v at
the same rank, float32), release freed memory to the system (``malloc_trim``), reset the peak (``/proc/self/
clear_refs``), then run a training step (forward, backward, AdamW) on ``batch`` x ``seq`` random tokens; the
measurement is the peak RSS of that step (``VmHWM``) over the RSS after the imports. A second step is measured
the same way and reported beside it: glibc's allocator keeps memory the first step freed and reuses it imperfectly,
so the second step peaks higher on this CPU (the prediction models the first). nf4 weights are random 4-bit
codes with the absmax of one quantized random prototype per shape (quantizing 6.5e9 weights on this CPU would take
about 12 minutes).

The fixed runtime overhead of the prediction is calibrated here, and only here: a tiny model (hidden 64, 2 layers)
is measured the same way for each quantization, and its measurement minus its other predicted components (under
1 MB) is the overhead used for every other row. The runs are resumable: rows already in ``memory.json`` are kept.
Writes ``memory.json``, ``memory.md`` and ``memory.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # Llama-architecture shapes (transformers LlamaConfig fields)
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 256, "tie_word_embeddings": False},
    "smollm2-135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True},
    "llama-1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                   "intermediate_size": 5632, "vocab_size": 32000, "tie_word_embeddings": False},  # TinyLlama's shape
    "llama2-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False},
}
ADAPTERS = ("tl6", "peft-lora")
# (shape, quantization, gradient checkpointing); each with every adapter. The tiny rows calibrate the overhead.
RUNS = [("tiny", "none", False), ("tiny", "nf4", False), ("smollm2-135m", "none", False), ("smollm2-135m", "nf4", False),
        ("llama-1.1b", "none", False), ("llama-1.1b", "nf4", False), ("llama-1.1b", "none", True),
        ("llama2-7b", "nf4", False), ("llama2-7b", "nf4", True)]


ALLOCATORS = {"default": {}, "mmap1m": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}  # glibc malloc: as it comes, or
# every allocation of 1 MiB and more mapped on its own (and returned to the system when freed)


def run_name(shape: str, quant: str, gc: bool, adapter: str, allocator: str = "default") -> str:
    return f"{shape}/{quant}{'/gc' if gc else ''}/{adapter}{'' if allocator == 'default' else '@' + allocator}"


def allocator(r: dict) -> str:
    return r.get("allocator", "default")


# ---- the measuring process ------------------------------------------------------------------------------------

def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def build(shape: str, quant: str):
    """A random Llama of ``shape`` in bfloat16, its decoder Linear layers nf4 where ``quant`` says so, built on the
    meta device and filled module by module."""
    import bitsandbytes as bnb
    import torch
    import transformers
    from torch import nn

    config = transformers.LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    protos = {}

    def nf4(lin: nn.Linear):
        shape_ = (lin.out_features, lin.in_features)
        if shape_ not in protos:
            w = (torch.randn(shape_, generator=gen) * 0.02).to(torch.bfloat16)
            protos[shape_] = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False,
                                                          quant_type="nf4")
        codes, state = protos[shape_]
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", device="meta")
        data = torch.randint(0, 256, codes.shape, dtype=torch.uint8, generator=gen)  # random 4-bit codes
        st = bnb.functional.QuantState(absmax=state.absmax.clone(), shape=state.shape, code=state.code.clone(),
                                       blocksize=state.blocksize, quant_type="nf4", dtype=torch.bfloat16)
        q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=st, blocksize=64, compress_statistics=False,
                                     quant_type="nf4", bnb_quantized=True, module=q)
        return q

    for name, module in list(model.named_modules()) if quant == "nf4" else ():
        for cname, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and ".layers." in f".{name}.{cname}":
                setattr(module, cname, nf4(child))
    for module in model.modules():  # the rest (embeddings, norms, the output layer): bfloat16
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.empty(p.shape, dtype=torch.bfloat16)
                t.normal_(0, 0.02, generator=gen) if p.ndim > 1 else t.fill_(1.0)
                module._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers computed, not loaded
    return model.train()


def exact_base_bytes(model) -> int:
    """The base's bytes as they are: parameters, buffers and 4-bit quantization states, each storage once."""
    seen = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        qs = getattr(t, "quant_state", None)
        for x in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
            if x is not None:
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(seen.values())


def child(spec: dict) -> dict:
    import ctypes
    import gc

    import bitsandbytes  # noqa: F401  every library imported before the baseline
    import peft
    import torch
    import transformers  # noqa: F401
    import tying.integrations.quant  # tying's bitsandbytes module types

    import tying

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    libc.malloc_trim(0)
    start = rss()
    t0 = time.perf_counter()
    model = build(spec["shape"], spec["quant"])
    base = exact_base_bytes(model)
    if spec["adapter"] == "peft-lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj"]))
    else:
        tying.apply_(model, tying.load_spec(spec["adapter"], rank=spec["rank"]), dtype=torch.float32)
    if spec["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, SHAPES[spec["shape"]]["vocab_size"], (spec["batch"], spec["seq"]),
                        generator=torch.Generator().manual_seed(1))
    gc.collect()
    libc.malloc_trim(0)
    built = rss()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses, peaks = [], []
    for _ in range(2):
        Path("/proc/self/clear_refs").write_text("5")  # the peak of this step alone
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del loss
        peaks.append(hwm() - start)
    return {"measured": peaks[0], "measured_second_step": peaks[1], "resident_before_steps": built - start,
            "base_exact": base,
            "adapter_params": sum(p.numel() for p in trainable),
            "adapter_dtypes": sorted({str(p.dtype) for p in trainable}), "losses": losses,
            "build_s": round(build_s, 1), "steps_s": round(time.perf_counter() - t0, 1), "start_rss": start}


# ---- the driver -----------------------------------------------------------------------------------------------

def predict(shape: str, quant: str, gc: bool, adapter: str, args, overhead: int) -> dict:
    import torch
    import transformers
    from tying.integrations.memory import predict_memory

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape]))
    return predict_memory(model, adapter, rank=args.rank, dtype=torch.bfloat16, quant=quant, batch=args.batch,
                          seq=args.seq, checkpointing=gc, overhead=overhead).to_dict()


def measure(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **ALLOCATORS[spec["allocator"]]}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{spec}: the measuring process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 2**20
    import bitsandbytes
    import peft
    import torch
    import transformers
    return (f"{cpu}, {os.cpu_count()} cores (one thread used), {mem} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}")


MB = 1e6


def table(res: dict) -> list[str]:
    lines = [("| model | base | checkpointing | adapter | malloc | predicted MB | measured MB (step 1) | error | step 2 MB | error "
              "vs step 2 | base (pred / exact) MB | adapter + activations + logits + working MB | overhead MB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"].values():
        p = r["predicted"]
        err = p["total"] / r["measured"] - 1
        lines.append(f"| {r['shape']} | {'bf16' if r['quant'] == 'none' else 'nf4 (bf16 compute)'} | "
                     f"{'on' if r['gc'] else 'off'} | {r['adapter']} | {allocator(r)} | {p['total'] / MB:,.1f} | {r['measured'] / MB:,.1f} "
                     f"| {err:+.1%} | {r['measured_second_step'] / MB:,.1f} | "
                     f"{p['total'] / r['measured_second_step'] - 1:+.1%} | {p['base'] / MB:,.1f} / {r['base_exact'] / MB:,.1f} | "
                     f"{(p['adapter'] + p['activations'] + p['logits'] + p['working']) / MB:,.1f} | "
                     f"{p['overhead'] / MB:,.1f} |")
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"].values() if r["shape"] != "tiny"]
    fig, ax = plt.subplots(figsize=(6, 5))
    for (adapter, marker), (alloc, color) in itertools.product(zip(ADAPTERS, "os"), zip(ALLOCATORS, ("C0", "C1"))):
        mine = [r for r in rows if r["adapter"] == adapter and allocator(r) == alloc]
        if mine:
            ax.scatter([r["measured"] / 2**30 for r in mine], [r["predicted"]["total"] / 2**30 for r in mine],
                       marker=marker, color=color, label=f"{adapter}, malloc {alloc}")
    top = max(max(r["measured"], r["predicted"]["total"]) for r in rows) / 2**30 * 1.1
    ax.plot([0, top], [0, top], "k-", lw=0.8, label="prediction = measurement")
    ax.fill_between([0, top], [0, top * 0.85], [0, top * 1.15], color="grey", alpha=0.2, label="within 15 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("measured peak RSS of a training step over the imports (GiB)")
    ax.set_ylabel("predicted (GiB)")
    ax.set_title(f"one training step, batch {res['batch']} x {res['seq']} tokens, rank {res['rank']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--runs", default="all", help="all, or comma-separated names shape/quant[/gc]/adapter")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/memory")
    ap.add_argument("--allocators", default="default", help=f"comma-separated: {', '.join(ALLOCATORS)}")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    if (res.get("rank"), res.get("batch"), res.get("seq")) != (args.rank, args.batch, args.seq):
        res = {"rank": args.rank, "batch": args.batch, "seq": args.seq, "rows": {}}
    res["machine"] = machine()
    res["command"] = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    want = None if args.runs == "all" else set(args.runs.split(","))
    for alloc, (shape, quant, gc), adapter in itertools.product(args.allocators.split(","), RUNS, ADAPTERS):
        name = run_name(shape, quant, gc, adapter, alloc)
        if name in res["rows"] or (want is not None and name not in want and shape != "tiny"):
            continue
        spec = {"shape": shape, "quant": quant, "gc": gc, "adapter": adapter, "rank": args.rank,
                "batch": args.batch, "seq": args.seq, "allocator": alloc}
        print(f"measuring {name} ...", flush=True)
        res["rows"][name] = {**spec, **measure(spec)}
        path.write_text(json.dumps(res, indent=1))
    # the overhead, calibrated on the tiny rows: measured minus the other predicted components, mean over adapters
    overhead = {}
    for quant, alloc in {(r["quant"], allocator(r)) for r in res["rows"].values()}:
        tiny = [r for r in res["rows"].values() if r["shape"] == "tiny" and r["quant"] == quant and allocator(r) == alloc]
        overhead[f"{quant}/{alloc}"] = round(sum(r["measured"] - predict(r["shape"], quant, r["gc"], r["adapter"], args,
                                                                         0)["total"] for r in tiny) / len(tiny))
    res["overhead"] = overhead
    for r in res["rows"].values():
        r["predicted"] = predict(r["shape"], r["quant"], r["gc"], r["adapter"], args,
                                 overhead[f"{r['quant']}/{allocator(r)}"])
        r["error"] = r["predicted"]["total"] / r["measured"] - 1
        r["error_second_step"] = r["predicted"]["total"] / r["measured_second_step"] - 1
    path.write_text(json.dumps(res, indent=1))
    md = [f"# Peak training memory: predicted vs measured (batch {args.batch} x {args.seq} tokens, rank {args.rank})", "",
          f"Machine: {res['machine']}.", f"Command: `{res['command']}`.", "",
          ("Overhead calibrated on the tiny model (quantization/allocator): "
           f"{', '.join(f'{k} {v / MB:.1f} MB' for k, v in sorted(overhead.items()))}."), "", *table(res), ""]
    for alloc in sorted({allocator(r) for r in res["rows"].values()}):
        big = [r for r in res["rows"].values() if r["shape"] != "tiny" and allocator(r) == alloc]
        if big:
            worst = max(big, key=lambda r: abs(r["error"]))
            which = run_name(worst["shape"], worst["quant"], worst["gc"], worst["adapter"], alloc)
            first = sum(abs(r["error"]) <= 0.15 for r in big)
            second = sum(abs(r["error_second_step"]) <= 0.15 for r in big)
            md.append(f"- malloc {alloc}: largest error {worst['error']:+.1%} ({which}); {first} of {len(big)} rows "
                      f"within 15 % of the first step, {second} of the second.")
    (out / "memory.md").write_text("\n".join(md) + "\n")
    if any(r["shape"] != "tiny" for r in res["rows"].values()):
        plot(res, out / "memory.png")
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
