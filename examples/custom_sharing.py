"""A custom sharing scheme (custom_sharing.yaml) on a plain PyTorch model: A shared by all layers,
B by groups of 4 layers, v per module. Needs only the core (`pip install -e .`).

    python examples/custom_sharing.py [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import tying

SPEC = Path(__file__).with_suffix(".yaml")


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Stands in for any model: tying only needs module names (here ``blocks.<i>.fc1`` / ``fc2``)."""

    def __init__(self, depth: int = 8, d: int = 32, h: int = 64):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d, h) for _ in range(depth)))

    def forward(self, x):
        return self.blocks(x)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    torch.manual_seed(0)
    model = ResidualMLP()
    # the task: match the base model followed by a fixed random linear map (something to adapt to)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = model(x) @ (torch.eye(32) + 0.1 * torch.randn(32, 32))

    spec = tying.load_spec(SPEC)
    plan = tying.plan(model, spec)            # pure: nothing is touched yet
    print(plan.summary())                     # 16 sites; 2 A, 4 B and 16 v tie groups
    counts = tying.apply_(model, plan)        # in place; the base is frozen
    lora = sum(spec.adapter.rank * (s.d_in + s.d_out) for s in plan.sites)
    print(f"trainable {counts.trainable:,}; untied LoRA of the same rank would train {lora:,}")

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    losses = []
    for _ in range(args.steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    with tempfile.TemporaryDirectory() as out:  # tied factors are written once each
        tying.save_adapter(model, out)
        fresh = ResidualMLP()
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("tying_bank.")})
        tying.load_adapter(fresh, out)
        same = torch.allclose(fresh(x), model(x))
    print(f"reloaded adapter gives the same outputs: {same}")
    return {"trainable": counts.trainable, "loss_first": losses[0], "loss_last": losses[-1], "reload_same": same}


if __name__ == "__main__":
    main()
