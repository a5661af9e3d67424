"""Tying across environments: one PPO policy adapter trained jointly for several CartPole pole lengths, against one
TL6 adapter per environment. Small-scale reproduction on a self-pretrained policy.

    python benchmarks/rl_tasks.py [--lengths 1.5 2.0 3.0] [--steps 15000] [--seeds 0 1 ... 9]
                                  [--out benchmarks/results/rl-tasks]

The pretrained policy is benchmarks/rl.py's (PPO, CartPole-v1, pole half-length 0.5; three hidden layers of 64 in
actor and critic; cached). Both contenders adapt it at rank 4 on the hidden layers of actor and critic, with the
action and value heads trained whole, Adam at rl.py's TL6 rate (1e-2), rl-zoo3's CartPole PPO settings:

- ``separate``: one TL6 adapter (and heads) per environment, each trained ``--steps`` steps on its own.
- ``joint``: ONE adapter, "TL6 across environments" (``load_spec("tl6", tasks=[...])``: A and B shared by every
  layer and environment, u and v per layer and environment; the heads one copy for all), trained round-robin: one
  PPO learner per environment, all sharing the policy and its optimizer, each learning 1,024 steps in turn inside
  ``tying.adapters(policy, its_environment)`` until every environment had ``--steps`` steps. Same steps per
  environment as ``separate``.

Score: deterministic return on each environment (20 episodes) per seed. The paired difference joint - separate over
(seed, environment) pairs gets a bootstrap 95 % interval (10,000 resamples). Writes ``<out>/rl_tasks.json`` and
``<out>/rl_tasks.md``; every finished seed is kept in the JSON, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import rl  # benchmarks/ is not a package: rl.py's pretrained policy, environments and evaluation
from tying.integrations import gymnasium as tg
from tying.integrations.llm.stats import verdict

import tying

RATE, CHUNK = rl.METHODS["tl6"][1], 1024


def task(length: float) -> str:
    return f"len{length:g}".replace(".", "_")


def learner(base: Path, length: float, seed: int):
    from stable_baselines3 import PPO

    env = rl.vec(rl.cartpole(length=length), seed)
    model = PPO.load(base, env=env, device="cpu", custom_objects={"learning_rate": RATE})
    model.set_random_seed(seed)
    return model


def separate(base: Path, lengths: list[float], steps: int, seed: int) -> dict:
    out = {}
    for length in lengths:
        model = learner(base, length, seed)
        counts = tg.adapt_sb3_(model, tg.spec(model.policy, "tl6", "both", rank=rl.RANK))
        model.learn(steps)
        out[task(length)] = {"return": rl.evaluate(model, rl.cartpole(length=length), 20, seed=10_000 + seed),
                             "trainable": counts.trainable}
    return out


def joint(base: Path, lengths: list[float], steps: int, seed: int) -> dict:
    models = [learner(base, length, seed) for length in lengths]
    names = [task(length) for length in lengths]
    policy = models[0].policy
    counts = tg.adapt_sb3_(models[0], tg.spec(policy, "tl6", "both", rank=rl.RANK, tasks=names))
    for m in models[1:]:
        m.policy = policy  # one policy, one optimizer: every learner steps the shared factors
    done = 0
    while done < steps:
        for name, model in zip(names, models):
            with tying.adapters(policy, name):
                model.learn(CHUNK, reset_num_timesteps=False)
        done += CHUNK
    out = {}
    for name, length, model in zip(names, lengths, models):
        with tying.adapters(policy, name):
            out[name] = {"return": rl.evaluate(model, rl.cartpole(length=length), 20, seed=10_000 + seed)}
    out["trainable"], out["per_task"] = counts.trainable, counts.per_task
    return out


def bootstrap(diffs: list[float], n: int = 10_000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    d = np.asarray(diffs)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def report(result: dict) -> str:
    names = [task(x) for x in result["lengths"]]
    seeds = sorted(result["seeds"], key=int)
    lines = [f"**Small-scale reproduction.** {result['setup']}", "",
             "| environment | pretrained (no adaptation) | separate TL6 | joint TL6 across environments |",
             "|---|---|---|---|"]
    diffs = []
    for name in names:
        sep = [result["seeds"][s]["separate"][name]["return"] for s in seeds]
        joi = [result["seeds"][s]["joint"][name]["return"] for s in seeds]
        diffs += [j - s for j, s in zip(joi, sep)]

        def cell(xs):
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            return f"{statistics.mean(xs):.0f} ± {sd:.0f} ({', '.join(f'{x:.0f}' for x in xs)})"

        lines.append(f"| pole half-length {name[3:].replace('_', '.')} m | {result['pretrained'][name]:.0f} | "
                     f"{cell(sep)} | {cell(joi)} |")
    s0 = result["seeds"][seeds[0]]
    sep_params = sum(s0["separate"][n]["trainable"] for n in names)
    lo, hi = bootstrap(diffs)
    margin = 0.1 * result["max_return"]

    lines += ["", (f"Trainable parameters (adapter factors and heads): separate {sep_params:,} in all "
                   f"({sep_params // len(names):,} per environment); joint {s0['joint']['trainable']:,} in all, one more "
                   f"environment adds {s0['joint']['per_task']:,}."),
              (f"Joint - separate, mean over {len(diffs)} (seed, environment) pairs: {statistics.mean(diffs):+.1f} "
              f"return, 95 % bootstrap interval [{lo:+.1f}, {hi:+.1f}]. \"Joint is no worse than separate by more than "
              f"10 % of the maximum return ({margin:.0f})\": **{verdict(lo, hi, margin)}**; \"joint is "
              f"better than separate\": **{verdict(lo, hi)}**."),
              ("Returns of PPO adaptation vary from seed to seed far more than between methods (one seed reaches 500 "
              "where another stays at the pretrained policy's 17-22), and they change with the number of threads: "
              "the separate TL6 on the 2 m pole scored 494, 88, 225 for seeds 0-2 in benchmarks/results/rl.md "
              "(two threads) against the one-thread runs here. Joint training also steps the shared A, B and heads "
              "on every environment's rollouts (3x the updates of one separate run): that, not only sharing, may "
              "explain a difference."),
              f"Seeds {', '.join(seeds)}; {result['seconds']:.0f} s of CPU time in all ({result['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--steps", type=int, default=15_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rl-tasks")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rl_tasks.json"
    setup = (f"PPO CartPole policy pretrained at pole half-length 0.5 (benchmarks/rl.py), adapted at rank 4 on the "
             f"hidden layers of actor and critic (heads trained whole) to pole half-lengths "
             f"{', '.join(f'{x:g}' for x in args.lengths)} m, {args.steps:,} steps per environment, Adam {RATE:g}; "
             "deterministic return over 20 episodes (maximum 500), mean ± standard deviation over seeds (per seed).")
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("setup") != setup:  # another setting: start over
        result = {"setup": setup, "lengths": args.lengths, "steps": args.steps, "seeds": {}, "seconds": 0.0,
                  "max_return": 500.0, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, "
                                                  f"torch {torch.__version__}, one thread"}
    base, _ = rl.pretrained()
    from stable_baselines3 import PPO

    pre = PPO.load(base, device="cpu")
    result["pretrained"] = {task(x): rl.evaluate(pre, rl.cartpole(length=x), 20) for x in args.lengths}
    for seed in args.seeds:
        if str(seed) in result["seeds"]:
            continue
        start = time.process_time()
        row = {"separate": separate(base, args.lengths, args.steps, seed),
               "joint": joint(base, args.lengths, args.steps, seed)}
        result["seconds"] += time.process_time() - start
        result["seeds"][str(seed)] = row
        path.write_text(json.dumps(result, indent=1))
        print(f"seed {seed}: " + ", ".join(f"{n}: separate {row['separate'][n]['return']:.0f}, joint "
                                           f"{row['joint'][n]['return']:.0f}" for n in map(task, args.lengths)),
              flush=True)
    (args.out / "rl_tasks.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
