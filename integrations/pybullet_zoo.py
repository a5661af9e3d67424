"""Real pretrained policies: the 2017 pybullet policy zoo, as gymnasium envs and SB3 PPO models.

``pybullet==3.2.7`` ships the zoo as numpy literals in
``pybullet_envs/examples/enjoy_TF_<Env>_2017may.py``: ReLU MLPs ``obs -> 128 -> 64 -> act``. Those
files are read with :mod:`ast` (never imported or executed). The environments need the legacy
``gym==0.26.2`` (and ``setuptools<81``); ``pybullet_envs`` registers them through a
``registry.env_specs`` attribute that gym 0.26 no longer has, so :func:`_import_pybullet_envs`
installs a small shim first.

    env = ZooEnv("HopperBulletEnv-v0", gravity=9.8 * 1.5)          # a gymnasium env
    model = zoo_ppo("HopperBulletEnv-v0", env)                      # SB3 PPO whose actor IS the zoo policy

Set up: ``pip install pybullet==3.2.7 gym==0.26.2 "setuptools<81"``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

MAX_STEPS = 1000  # the zoo's TimeLimit for the locomotion envs
_WEIGHTS = ("weights_dense1_w", "weights_dense1_b", "weights_dense2_w", "weights_dense2_b",
            "weights_final_w", "weights_final_b")


def _import_pybullet_envs():
    """Import ``pybullet_envs`` under gym 0.26, whose registry is a plain dict without ``env_specs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import gym.envs.registration as reg
        except ImportError as e:
            raise ImportError("the pybullet zoo needs: pip install pybullet==3.2.7 gym==0.26.2 'setuptools<81'") from e
        if not hasattr(reg.registry, "env_specs"):
            class _Registry(dict):
                @property
                def env_specs(self):
                    return self

            reg.registry = _Registry(reg.registry)  # gym's register() and make() read the module global
        return importlib.import_module("pybullet_envs")


def zoo_weights(env_id: str = "HopperBulletEnv-v0") -> dict[str, np.ndarray]:
    """The zoo policy's six arrays (``weights_dense1_w`` ... ``weights_final_b``), parsed from the
    example file's ``np.array([...])`` literals without running it."""
    pkg = Path(importlib.util.find_spec("pybullet_envs").origin).parent
    src = pkg / "examples" / f"enjoy_TF_{env_id.replace('-', '_')}_2017may.py"
    if not src.is_file():
        raise FileNotFoundError(f"no zoo policy for {env_id!r}: {src} does not exist")
    out = {}
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in _WEIGHTS:
            out[node.targets[0].id] = np.array(ast.literal_eval(node.value.args[0]), dtype=np.float32)
    missing = set(_WEIGHTS) - set(out)
    if missing:
        raise ValueError(f"{src} lacks {sorted(missing)}")
    return out


def _gymnasium():
    import gymnasium
    return gymnasium


class ZooEnv(_gymnasium().Env):
    """A pybullet locomotion env (legacy gym API) as a gymnasium env with a chosen ``gravity``
    (m/s^2, default Earth's 9.8) and the zoo's 1,000-step limit (reported as truncation)."""

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(self, env_id: str = "HopperBulletEnv-v0", gravity: float = 9.8):
        gymnasium = _gymnasium()
        _import_pybullet_envs()
        import gym

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod, cls = gym.envs.registration.registry[env_id].entry_point.split(":")
            self._env = getattr(importlib.import_module(mod), cls)()
        self.gravity, self._t = gravity, 0
        box = self._env.observation_space
        self.observation_space = gymnasium.spaces.Box(box.low.astype(np.float32), box.high.astype(np.float32))
        act = self._env.action_space
        self.action_space = gymnasium.spaces.Box(act.low.astype(np.float32), act.high.astype(np.float32))

    def reset(self, *, seed: int | None = None, options=None):
        """Reset the robot; ``seed`` seeds pybullet's own RNG (its initial-state noise)."""
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(seed)
        obs = self._env.reset()
        self._env._p.setGravity(0, 0, -self.gravity)  # after the scene's own reset, which sets 9.8
        self._t = 0
        return np.asarray(obs, dtype=np.float32), {}

    def step(self, action):
        """One step; ``terminated`` when the robot falls, ``truncated`` at the step limit."""
        obs, reward, done, info = self._env.step(np.asarray(action, dtype=np.float32))
        self._t += 1
        return np.asarray(obs, dtype=np.float32), float(reward), bool(done), self._t >= MAX_STEPS and not done, info

    def close(self):
        """Disconnect the physics client."""
        self._env.close()


def zoo_ppo(env_id: str, env, log_std: float = -1.0, seed: int = 0, **ppo_kwargs):
    """An SB3 PPO model on ``env`` whose actor is the zoo policy, exactly: ``mlp_extractor.policy_net``
    = (Linear obs->128, ReLU, Linear 128->64, ReLU) and ``action_net`` = Linear 64->act hold the zoo
    weights, so the deterministic action equals the zoo's. The critic (same widths) starts random;
    ``log_std`` is the Gaussian's initial log standard deviation."""
    from stable_baselines3 import PPO

    w = zoo_weights(env_id)
    kwargs = {"net_arch": {"pi": [128, 64], "vf": [128, 64]}, "activation_fn": nn.ReLU, "log_std_init": log_std}
    model = PPO("MlpPolicy", env, policy_kwargs=kwargs, seed=seed, device="cpu", **ppo_kwargs)
    pol = model.policy
    layers = [pol.mlp_extractor.policy_net[0], pol.mlp_extractor.policy_net[2], pol.action_net]
    with torch.no_grad():
        for layer, name in zip(layers, ("dense1", "dense2", "final")):
            layer.weight.copy_(torch.from_numpy(w[f"weights_{name}_w"]).T)
            layer.bias.copy_(torch.from_numpy(w[f"weights_{name}_b"]))
    return model
