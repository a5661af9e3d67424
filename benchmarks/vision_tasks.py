"""Tying across vision tasks: one ViT adapter trained jointly on two target splits, against one TL6 per split.
Small-scale reproduction on a self-pretrained backbone.

    python benchmarks/vision_tasks.py [--seeds 0 1 2 3 4] [--n-train 4000] [--epochs 3]
                                      [--out benchmarks/results/vision-tasks]

The backbone is benchmarks/vision.py's self-pretrained timm ViT (6 blocks, width 64; MNIST digits 0-4; cached).
The two target splits (MNIST has no other; no other image data can be fetched here): ``upright``, digits 5-9
relabelled 0-4 (vision.py's target), and ``rotated``, the same digits turned 90 degrees. Both contenders adapt the
fused qkv of every block at rank 8 with vision.py's quick-mode TL6 rate (3e-2; head 1e-2), AdamW, warm-up and cosine,
batch 64, ``--epochs`` epochs over ``--n-train`` images per split:

- ``separate``: one TL6 adapter and one new 5-way head per split, each trained on its split alone.
- ``joint``: ONE adapter, "TL6 across tasks" (A and B shared by every block and both splits; u and v per block and
  split) and one shared head, trained on the two splits' images shuffled together (every batch mixes them;
  ``tying.adapters(model, names)`` routes each row): the same images and epochs, so the same updates per image.

Score: test accuracy per split (4,861 images each), per seed; the joint - separate difference per split gets a
paired bootstrap 95 % interval over test images and seeds (10,000 resamples). Writes ``<out>/vision_tasks.json``
(per-image hits kept) and ``<out>/vision_tasks.md``; finished seeds are kept, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import vision  # benchmarks/ is not a package: vision.py's backbone, data, training loop and scoring
from tying.integrations import timm as tt
from tying.integrations.llm.stats import verdict

import tying

LR, SPLITS = 3e-2, ("upright", "rotated")


def split_data(split, name: str, n: int | None):
    x, y = vision.digits(split, 5, n)
    return (x.rot90(1, (2, 3)).contiguous() if name == "rotated" else x), y


def model_for(state: dict, seed: int, tasks: list[str] | None):
    model = vision.make_vit()
    model.load_state_dict(state)
    torch.manual_seed(seed)
    model.reset_classifier(5)
    counts = tying.apply_(model, tt.spec(model, "tl6", "attn_qkv", rank=8, tasks=tasks))
    model.head.requires_grad_(True)
    groups = [{"params": [p for p in model.tying_bank.parameters() if p.requires_grad], "lr": LR},
              {"params": list(model.head.parameters()), "lr": vision.HEAD_LR}]
    return model, groups, counts


class Routed(torch.nn.Module):
    """The model with each row routed to its split: ``vision.train`` calls ``model(x[idx])`` on images whose
    split is the last channel's constant (added here, removed before the ViT)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        names = [SPLITS[int(i)] for i in x[:, 1, 0, 0].tolist()]
        with tying.adapters(self.model, names):
            return self.model(x[:, :1])


def run_seed(state: dict, data: dict, seed: int, args) -> dict:
    out = {"separate": {}, "joint": {}}
    for name in SPLITS:
        model, groups, counts = model_for(state, seed, None)
        vision.train(model, groups, data[name]["train"], args.epochs, 64, seed, f"separate {name}")
        out["separate"][name] = {"hits": vision.hits(model, data[name]["test"]), "trainable": counts.trainable + 325}
    model, groups, counts = model_for(state, seed, list(SPLITS))
    tagged = [torch.cat([x, torch.full_like(x, float(i))], 1) for i, n in enumerate(SPLITS)
              for x in [data[n]["train"][0]]]
    x = torch.cat(tagged)
    y = torch.cat([data[n]["train"][1] for n in SPLITS])
    vision.train(Routed(model), groups, (x, y), args.epochs, 64, seed, "joint")
    for name in SPLITS:
        with tying.adapters(model, name):
            out["joint"][name] = {"hits": vision.hits(model, data[name]["test"])}
    out["joint"]["trainable"], out["joint"]["per_task"] = counts.trainable + 325, counts.per_task
    return out


def paired_interval(a: list[str], b: list[str], n: int = 10_000) -> tuple[float, float, float]:
    """Mean of a - b (accuracy points) over the concatenated per-image hits, and its bootstrap 95 % interval."""
    d = np.array([int(x) - int(y) for sa, sb in zip(a, b) for x, y in zip(sa, sb)], dtype=np.float64)
    rng = np.random.default_rng(0)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(n)])
    return 100 * d.mean(), 100 * np.percentile(means, 2.5), 100 * np.percentile(means, 97.5)


def acc(hits: list[str]) -> list[float]:
    """Accuracy (%) of each seed's per-image hit string."""
    return [100 * h.count("1") / len(h) for h in hits]


def report(result: dict) -> str:
    seeds = sorted(result["seeds"], key=int)
    rows = result["seeds"]
    lines = [f"**Small-scale reproduction.** {result['setup']}", "",
             ("| split | separate TL6 (accuracy %, per seed) | joint TL6 across splits | joint - separate [95 % CI] | "
              "\"joint within 10 % of separate\" |"), "|---|---|---|---|---|"]
    for name in SPLITS:
        sep = [rows[s]["separate"][name]["hits"] for s in seeds]
        joi = [rows[s]["joint"][name]["hits"] for s in seeds]
        mean, lo, hi = paired_interval(joi, sep)
        margin = 0.1 * statistics.mean(acc(sep))
        lines.append(f"| {name} | {statistics.mean(acc(sep)):.1f} ({', '.join(f'{a:.1f}' for a in acc(sep))}) | "
                     f"{statistics.mean(acc(joi)):.1f} ({', '.join(f'{a:.1f}' for a in acc(joi))}) | "
                     f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}] | {verdict(lo, hi, margin)} |")
    s0 = rows[seeds[0]]
    sep_params = sum(s0["separate"][n]["trainable"] for n in SPLITS)
    lines += ["", (f"Trainable parameters (adapter factors and the 325 of a head): separate {sep_params:,} in all; "
                   f"joint {s0['joint']['trainable']:,} in all (one head), one more split adds "
                   f"{s0['joint']['per_task']:,}."),
              f"Seeds {', '.join(seeds)}; {result['seconds']:.0f} s in all ({result['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vision-tasks")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mnist = vision.load_mnist()
    state, record = vision.pretrained_backbone(mnist)
    data = {n: {"train": split_data(mnist["train"], n, args.n_train), "test": split_data(mnist["test"], n, None)}
            for n in SPLITS}
    setup = (f"timm ViT (6 blocks, width 64) self-pretrained on MNIST digits 0-4 (test accuracy "
             f"{record['test_accuracy']:.4f}), adapted to digits 5-9 upright and turned 90 degrees: {args.n_train:,} "
             f"training images per split, {args.epochs} epochs, batch 64, TL6 rank 8 on the fused qkv, LR {LR:g} "
             f"(head {vision.HEAD_LR:g}); {len(data['upright']['test'][1]):,} test images per split.")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vision_tasks.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("setup") != setup:
        result = {"setup": setup, "seeds": {}, "seconds": 0.0,
                  "machine": f"{platform.machine()} CPU, 2-core machine, one thread, torch {torch.__version__}"}
    for seed in args.seeds:
        if str(seed) in result["seeds"]:
            continue
        start = time.time()
        result["seeds"][str(seed)] = run_seed(state, data, seed, args)
        result["seconds"] += time.time() - start
        path.write_text(json.dumps(result))
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    (args.out / "vision_tasks.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
