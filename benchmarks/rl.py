"""Tied adapters on RL policies: adapt a pretrained PPO policy to changed physics.

1. CartPole, self-pretrained. A stable-baselines3 PPO policy with three equal hidden layers (64) in
   both actor and critic is pretrained on CartPole-v1 (cached under $TYING_CACHE, default
   ~/.cache/tying/rl), then adapted to a variant with a 4x longer pole (half-length 0.5 -> 2.0 m,
   on which the pretrained policy fails at once) by: no adaptation, full fine-tuning, LoRA, TL6
   (tied-ABuv) and the VeRA-like setting (tied-uv), all rank 4 on the hidden layers of actor AND
   critic (tying.integrations.gymnasium, shape-aware ties), and PPO from scratch, each for the same
   number of steps. The action and value heads are trained in every adapter setting and counted.
   Score: deterministic return on the variant (20 episodes), per seed; curves: training-episode
   returns (the stochastic policy) against steps.
2. A REAL pretrained policy: the 2017 pybullet zoo's Hopper (15 -> 128 -> 64 -> 3 ReLU MLP; via
   tying.integrations.pybullet_zoo) under 1.5x gravity, adapted by PPO with a shape-aware TL6 on its
   actor (A, B tied across the 128- and 64-wide layers where shapes allow) and a fresh critic.

    python benchmarks/rl.py --quick     # 3 seeds, short runs; ~8 min on 2 shared CPU cores, cold
    python benchmarks/rl.py             # 5 seeds, longer runs

Writes benchmarks/results/rl.{json,md,png}. The zoo part is skipped (and said so) if pybullet is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tying.integrations import gymnasium as tg

import tying

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("TYING_CACHE", Path.home() / ".cache" / "tying")) / "rl"
SOURCE, VARIANT = {}, {"length": 2.0}  # CartPole-v1 physics overrides (the default half-length is 0.5)
# rl-zoo3's CartPole hyperparameters (8 envs x 32 steps per update, 20 epochs)
PPO_KW = {"n_steps": 32, "batch_size": 256, "gae_lambda": 0.8, "gamma": 0.98, "n_epochs": 20, "ent_coef": 0.0}
NET = {"net_arch": {"pi": [64, 64, 64], "vf": [64, 64, 64]}}
PRETRAIN = {"steps": 60_000, "lr": 1e-3, "seed": 0}
RANK = 4  # the first layer reads 4 observations, so rank <= 4
METHODS = {"none": (None, 0.0), "full": (None, 1e-3), "lora": ("lora", 3e-3), "tl6": ("tl6", 1e-2),
           "vera": ("vera", 1e-2), "scratch": (None, 1e-3)}  # method -> (preset, learning rate)
# LRs: the better of two values in one 15k-step probe on seed 0 (full 3e-4 | 1e-3, lora 3e-3 | 1e-2,
# tl6 3e-3 | 1e-2, vera 1e-2 | 3e-2); scratch uses the pretraining LR. Full fine-tuning at 3e-4 never
# left the failing policy (return 18) in 15k steps.
MODES = {"quick": {"steps": 15_000, "seeds": [0, 1, 2], "zoo_steps": 20_000, "zoo_eval": 5},
         "full": {"steps": 40_000, "seeds": [0, 1, 2, 3, 4], "zoo_steps": 100_000, "zoo_eval": 10}}
ZOO = {"env": "HopperBulletEnv-v0", "gravity": 9.8 * 1.5, "lr": 3e-4, "log_std": -1.0, "preset": "tl6", "rank": 8}


def cartpole(**physics):
    """A CartPole-v1 factory with physics overrides (gravity, masscart, masspole, length, force_mag)."""
    import gymnasium as gym

    def make():
        env = gym.make("CartPole-v1")
        u = env.unwrapped
        for k, v in physics.items():
            setattr(u, k, v)
        u.total_mass, u.polemass_length = u.masspole + u.masscart, u.masspole * u.length  # derived in __init__
        return env

    return make


def vec(factory, seed, n=8):
    from stable_baselines3.common.env_util import make_vec_env

    return make_vec_env(factory, n_envs=n, seed=seed)


class Curve:
    """An SB3 callback recording (timestep, return) of every finished training episode."""

    def __new__(cls):
        from stable_baselines3.common.callbacks import BaseCallback

        class _Curve(BaseCallback):
            def __init__(self):
                super().__init__()
                self.points = []

            def _on_step(self) -> bool:
                self.points += [(self.num_timesteps, float(i["episode"]["r"])) for i in self.locals["infos"] if "episode" in i]
                return True

        return _Curve()


def evaluate(model, factory, episodes, seed=10_000) -> float:
    """Mean deterministic return over ``episodes`` episodes."""
    from stable_baselines3.common.evaluation import evaluate_policy

    env = vec(factory, seed, n=1)
    mean, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True)
    return float(mean)


def pretrained() -> tuple[Path, dict]:
    """The self-pretrained CartPole PPO model (trained once, then read from the cache) and its record."""
    from stable_baselines3 import PPO

    key = hashlib.sha256(json.dumps([PPO_KW, NET, PRETRAIN], sort_keys=True).encode()).hexdigest()[:12]
    path, rec_path = CACHE / f"ppo_cartpole_{key}.zip", CACHE / f"ppo_cartpole_{key}.json"
    if path.is_file() and rec_path.is_file():
        return path, json.loads(rec_path.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    model = PPO("MlpPolicy", vec(cartpole(**SOURCE), PRETRAIN["seed"]), learning_rate=PRETRAIN["lr"], policy_kwargs=NET,
                seed=PRETRAIN["seed"], device="cpu", **PPO_KW)
    start = time.time()
    model.learn(PRETRAIN["steps"])
    record = {**PRETRAIN, "seconds": round(time.time() - start, 1), "params": sum(p.numel() for p in model.policy.parameters()),
              "return_source": evaluate(model, cartpole(**SOURCE), 20), "return_variant": evaluate(model, cartpole(**VARIANT), 20)}
    model.save(path)
    rec_path.write_text(json.dumps(record))
    return path, record


def build(method: str, base: Path, seed: int):
    """The PPO model for ``method`` on the variant; returns (model, trainable parameter count)."""
    from stable_baselines3 import PPO

    preset, lr = METHODS[method]
    env = vec(cartpole(**VARIANT), seed)
    if method == "scratch":
        model = PPO("MlpPolicy", env, learning_rate=lr, policy_kwargs=NET, seed=seed, device="cpu", **PPO_KW)
        return model, sum(p.numel() for p in model.policy.parameters())
    model = PPO.load(base, env=env, device="cpu", custom_objects={"learning_rate": lr})
    model.set_random_seed(seed)
    if method == "none":
        return model, 0
    if preset is None:
        tg.rebuild_optimizer_(model)  # fresh Adam state: no pretraining moments for full fine-tuning
        return model, sum(p.numel() for p in model.policy.parameters())
    counts = tg.adapt_sb3_(model, tg.spec(model.policy, preset, "both", rank=RANK))  # heads trained whole
    return model, counts.trainable


def run_cartpole(cfg: dict) -> dict:
    base, pre = pretrained()
    print(f"pretrained: return {pre['return_source']:.0f} on CartPole-v1, {pre['return_variant']:.0f} on the variant", flush=True)
    rows = {}
    for method in METHODS:
        returns, curves, secs = [], [], []
        for seed in cfg["seeds"]:
            model, n_trainable = build(method, base, seed)
            curve, start = Curve(), time.time()
            if method != "none":
                model.learn(cfg["steps"], callback=curve)
            secs.append(round(time.time() - start, 1))
            returns.append(evaluate(model, cartpole(**VARIANT), 20, seed=10_000 + seed))
            curves.append(curve.points)
        rows[method] = {"preset": METHODS[method][0], "lr": METHODS[method][1], "trainable": n_trainable,
                        "returns": returns, "mean": statistics.mean(returns),
                        "std": statistics.stdev(returns) if len(returns) > 1 else 0.0, "train_seconds": secs, "curves": curves}
        print(f"{method:>8}: return {rows[method]['mean']:6.1f} ± {rows[method]['std']:5.1f}  {returns}  "
              f"trainable {n_trainable:,}  ({sum(secs):.0f} s)", flush=True)
    return {"pretrain": pre, "methods": rows}


def run_zoo(cfg: dict) -> dict:
    """Adapt the pybullet zoo's Hopper to 1.5x gravity; returns before and after, or why skipped."""
    try:
        from tying.integrations.pybullet_zoo import ZooEnv, zoo_ppo
    except ImportError as e:
        return {"skipped": str(e)}
    try:
        earth, heavy = ZooEnv(ZOO["env"]), ZooEnv(ZOO["env"], gravity=ZOO["gravity"])
    except ImportError as e:
        return {"skipped": str(e)}

    def score(model, env, n):
        out = []
        for ep in range(n):
            obs, _ = env.reset(seed=1000 + ep)
            total, done = 0.0, False
            while not done:
                obs, r, term, trunc, _ = env.step(model.predict(obs, deterministic=True)[0])
                total, done = total + r, term or trunc
            out.append(total)
        return out

    model = zoo_ppo(ZOO["env"], heavy, log_std=ZOO["log_std"], learning_rate=ZOO["lr"], n_steps=1024, batch_size=64)
    n = cfg["zoo_eval"]
    before_earth, before = score(model, earth, n), score(model, heavy, n)
    # shape-aware TL6 on the actor's two hidden layers; the random critic is trained whole, as are both heads
    spec = tg.spec(model.policy, ZOO["preset"], "actor", rank=ZOO["rank"])
    spec = tying.load_spec(spec, train_modules=[*spec.train_modules, "mlp_extractor.value_net"])
    counts = tg.adapt_sb3_(model, spec)
    actor_adapter = counts.trainable - counts.modules
    curve, start = Curve(), time.time()
    model.learn(cfg["zoo_steps"], callback=curve)
    secs = time.time() - start
    after = score(model, heavy, n)
    groups = {f"{g.factor}.{g.key}": list(g.members) for g in tying.bank_of(model.policy).plan.groups}
    return {**ZOO, "steps": cfg["zoo_steps"], "episodes": n, "return_earth_before": before_earth,
            "return_before": before, "return_after": after, "actor_adapter_params": actor_adapter,
            "trained_whole_params": counts.modules, "train_seconds": round(secs, 1), "tie_groups": groups, "curve": curve.points}


def binned(points, steps, bins=15):
    """Mean return of the episodes that ended in each bin of training steps; a bin where none ended
    (long episodes) repeats the previous bin's value."""
    edges = np.linspace(0, steps, bins + 1)
    out = []
    for lo, hi in itertools.pairwise(edges):
        vals = [r for t, r in points if lo < t <= hi]
        out.append(float(np.mean(vals)) if vals else (out[-1] if out else float("nan")))
    return edges[1:], np.array(out)


def curve_mean(r: dict, steps: int) -> float:
    """Mean of the binned training curve over the run and the seeds: a sample-efficiency score."""
    return float(np.nanmean([binned(c, steps)[1] for c in r["curves"]])) if r["curves"][0] else float("nan")


def write(result: dict) -> str:
    """Write rl.json, rl.md and rl.png; return the markdown."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rl.json").write_text(json.dumps(result, indent=1) + "\n")
    cp, pre = result["cartpole"], result["cartpole"]["pretrain"]
    lines = [(f"CartPole-v1 PPO (SB3; actor and critic 3 x 64 tanh, {pre['params']:,} params) pretrained {pre['steps']:,} steps "
             f"(return {pre['return_source']:.0f}), adapted to a 4x longer pole (`length` 0.5 -> 2.0; pretrained return "
             f"there {pre['return_variant']:.0f}). Mode `{result['mode']}`: {result['steps']:,} PPO steps per run, seeds "
             f"{result['seeds']}, rank {RANK} on the hidden layers of actor and critic; heads trained and counted in "
             f"every adapter setting. Return: deterministic, 20 episodes (max 500). Wall time {result['wall_seconds']:.0f} s."),
             "", "| method | trainable params | final return (mean ± std) | per seed | mean training return | LR | train s |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name, r in cp["methods"].items():
        seeds = ", ".join(f"{x:.0f}" for x in r["returns"])
        auc = "—" if name == "none" else f"{curve_mean(r, result['steps']):.1f}"
        lines.append(f"| {name} | {r['trainable']:,} | {r['mean']:.1f} ± {r['std']:.1f} | {seeds} | {auc} | "
                     f"{r['lr'] or '—'} | {sum(r['train_seconds']):.0f} |")
    lines.append("\nMean training return: the learning curve (training episodes, stochastic policy, 15 bins) averaged "
                 "over the run and the seeds; higher means it learned sooner.")
    z = result["zoo"]
    lines.append("")
    if "skipped" in z:
        lines.append(f"pybullet zoo: skipped ({z['skipped']}).")
    else:
        def mean(xs):
            return f"{np.mean(xs):.0f} ± {np.std(xs):.0f}"

        lines += [(f"Real pretrained policy: pybullet zoo {z['env']} (2017, 15 -> 128 -> 64 -> 3 ReLU) under gravity "
                  f"{z['gravity']:.2f} (1.5x). PPO {z['steps']:,} steps, shape-aware {z['preset']} rank {z['rank']} on the "
                  f"actor ({z['actor_adapter_params']:,} params, {len(z['tie_groups'])} tie groups), fresh critic and both "
                  f"heads trained whole ({z['trained_whole_params']:,} params), log_std {z['log_std']} frozen; LR "
                  f"{z['lr']:g}; {z['train_seconds']:.0f} s. Deterministic returns over {z['episodes']} episodes:"), "",
                  "| policy | gravity 9.8 | gravity 14.7 |", "|---|---:|---:|",
                  f"| zoo, as shipped | {mean(z['return_earth_before'])} | {mean(z['return_before'])} |",
                  f"| zoo + tied adapter | — | {mean(z['return_after'])} |"]
    md = "\n".join(lines)
    (RESULTS / "rl.md").write_text(md + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 if "skipped" in z else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for name, r in cp["methods"].items():
        if name == "none":
            ax.axhline(r["mean"], color="grey", ls="--", label="none (pretrained)")
            continue
        x, _ = binned([], result["steps"])
        ys = np.array([binned(c, result["steps"])[1] for c in r["curves"]])
        m = np.nanmean(ys, axis=0)
        ax.plot(x, m, label=f"{name} ({r['trainable']:,})")
        if len(ys) > 1:
            s = np.nanstd(ys, axis=0)
            ax.fill_between(x, m - s, m + s, alpha=0.15)
    ax.set_xlabel("PPO steps on the variant")
    ax.set_ylabel("training-episode return")
    ax.set_title(f"CartPole, 4x longer pole ({len(result['seeds'])} seeds, mean ± std)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if panels == 2:
        ax = axes[0][1]
        x, y = binned(z["curve"], z["steps"], bins=10)
        ax.plot(x, y, label="training episodes (stochastic)")
        ax.axhline(np.mean(z["return_before"]), color="grey", ls="--", label="zoo before, deterministic")
        ax.axhline(np.mean(z["return_after"]), color="C2", ls="--", label="after, deterministic")
        ax.set_ylim(0, 1.1 * max(np.nanmax(y), np.mean(z["return_after"])))
        ax.set_xlabel("PPO steps at 1.5x gravity")
        ax.set_ylabel("return")
        ax.set_title(f"pybullet zoo Hopper, shape-aware {z['preset']} on the actor", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "rl.png", dpi=120)
    return md


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, short runs (under 10 min on 2 cores)")
    parser.add_argument("--no-zoo", action="store_true", help="skip the pybullet zoo part")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small MLPs: one thread is fastest, and the machine is shared
    mode = "quick" if args.quick else "full"
    cfg, start = MODES[mode], time.time()
    result = {"mode": mode, **cfg, "variant": VARIANT, "ppo": PPO_KW, "net": NET, "rank": RANK}
    result["cartpole"] = run_cartpole(cfg)
    result["zoo"] = {"skipped": "--no-zoo"} if args.no_zoo else run_zoo(cfg)
    result["wall_seconds"] = round(time.time() - start, 1)
    print(write(result))


def rewrite() -> str:
    """Rewrite rl.md and rl.png from rl.json (no training)."""
    return write(json.loads((RESULTS / "rl.json").read_text()))


if __name__ == "__main__":
    main()
