"""TL6 with shape-aware ties on the actor and critic of an SB3 PPO policy (ppo_policy.yaml).
Needs `pip install -e ".[rl]"`.

A PPO policy is trained briefly on CartPole-v1 (it stands in for a pretrained policy), saved, then
adapted to a pole 4x longer (as benchmarks/rl.py does, at a much smaller budget) with only the
adapter and the two heads trained. The adapter is saved and loaded onto the reloaded base policy.
One seed at a tiny budget: the returns are noisy (docs/results-rl.md has the measured comparison).

    python examples/ppo_policy.py [--pretrain 5000] [--adapt 5000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from tying.integrations.gymnasium import adapt_sb3_, load_sb3_adapter, save_sb3_adapter

import tying

SPEC = Path(__file__).with_suffix(".yaml")


def make_env(pole_length: float = 0.5) -> gym.Env:
    env = gym.make("CartPole-v1")
    env.unwrapped.length = pole_length  # half-length in gymnasium's CartPole; 0.5 is the default
    return env


def build_model(env: gym.Env, seed: int = 0) -> PPO:
    """An SB3 PPO MlpPolicy: actor and critic bodies of two 64-wide Tanh layers each."""
    return PPO("MlpPolicy", env, n_steps=512, batch_size=64, n_epochs=4, seed=seed, device="cpu")


def score(model: PPO, env: gym.Env) -> float:
    """Mean deterministic return over 10 episodes (CartPole's maximum: 500)."""
    return float(evaluate_policy(model, Monitor(env), n_eval_episodes=10, deterministic=True)[0])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain", type=int, default=5000, help="PPO steps on the default pole")
    p.add_argument("--adapt", type=int, default=5000, help="PPO steps of adapter training on the long pole")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a policy this small runs fastest on one thread
    model = build_model(make_env()).learn(args.pretrain)
    long_pole = make_env(2.0)
    before = score(model, long_pole)

    with tempfile.TemporaryDirectory() as out:
        model.save(f"{out}/base.zip")  # save the base BEFORE adapting: PPO.load builds the unadapted policy
        spec = tying.load_spec(SPEC)
        print(tying.plan(model.policy, spec).summary())  # A: 2 groups (obs and 64 wide), each actor + critic
        n_base = sum(q.numel() for q in model.policy.parameters())
        counts = adapt_sb3_(model, spec)                  # apply_ + a policy.optimizer over the new parameters
        print(f"trainable {counts.trainable:,} (the base policy has {n_base:,} parameters)")
        model.set_env(long_pole)
        model.learn(args.adapt, reset_num_timesteps=False)
        after = score(model, long_pole)
        print(f"long-pole return (max 500): {before:.0f} before, {after:.0f} after {args.adapt} adapter steps")

        save_sb3_adapter(model, f"{out}/adapter")
        fresh = PPO.load(f"{out}/base.zip", device="cpu")
        load_sb3_adapter(fresh, f"{out}/adapter", replace_modules=True)  # our own folder: its heads may load
        obs = torch.as_tensor(long_pole.observation_space.sample()[None])
        with torch.no_grad():
            same = torch.allclose(fresh.policy.predict_values(obs), model.policy.predict_values(obs), atol=1e-5)
    print(f"reloaded adapter gives the same values: {same}")
    return {"trainable": counts.trainable, "return_before": before, "return_after": after, "reload_same": same}


if __name__ == "__main__":
    main()
