"""One adapter for three tasks (multitask_tl6.yaml): A and B shared by every layer, projection and task, u and v per
task; trained on mixed batches (each row names its task), saved once, one task loaded alone, every task served in
one batch. Needs only the core (`pip install -e .`); the model carries a Llama's module names, so the spec applies
unchanged to a real Llama.

    python examples/multitask_tl6.py [--steps 150]     (examples/multitask_vera.py: the VeRA-like spec)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import tying

SPEC = Path(__file__).with_name("multitask_tl6.yaml")


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = Attention(d)

    def forward(self, x):
        return x + self.self_attn(x)


class Inner(nn.Module):
    def __init__(self, layers: int, d: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TinyLM(nn.Module):
    """Stands in for a Llama: the adapted modules are named ``model.layers.<i>.self_attn.{q,k,v}_proj``."""

    def __init__(self, layers: int = 4, d: int = 32):
        super().__init__()
        self.model = Inner(layers, d)

    def forward(self, x):
        return self.model(x)


def base_model() -> TinyLM:
    """The 'pretrained' base: the same weights at every call."""
    torch.manual_seed(0)
    return TinyLM().eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--spec", default=str(SPEC))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    model = base_model()
    torch.manual_seed(1)
    spec = tying.load_spec(args.spec)
    tasks = spec.tasks
    x = torch.randn(96, 32)
    with torch.no_grad():  # each task: the base model followed by its own fixed random map
        base = model(x)
        targets = {t: base @ (torch.eye(32) + 0.1 * torch.randn(32, 32)) for t in tasks}
    task_of = [tasks[i % len(tasks)] for i in range(len(x))]  # every batch mixes the three tasks
    y = torch.stack([targets[t][i] for i, t in enumerate(task_of)])

    counts = tying.apply_(model, spec)
    print(tying.plan(base_model(), spec).summary().splitlines()[-1])
    print(f"trainable {counts.trainable:,} for {len(tasks)} tasks; one more task adds {counts.per_task:,}")

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)

    def task_losses() -> dict[str, float]:
        with torch.no_grad(), tying.adapters(model, task_of):
            err = (model(x) - y).pow(2).mean(-1)
        return {t: err[[i for i, n in enumerate(task_of) if n == t]].mean().item() for t in tasks}

    first = task_losses()
    for _ in range(args.steps):
        with tying.adapters(model, task_of):  # row i trains task_of[i]; A and B get the sum of the tasks' gradients
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    last = task_losses()
    for t in tasks:
        print(f"task {t:<8} loss {first[t]:.4f} -> {last[t]:.4f}")

    with tempfile.TemporaryDirectory() as out:
        tying.save_adapter(model, out)  # every task in one folder, shared factors once
        one = base_model()
        tying.load_adapter(one, out, task=tasks[1])  # a plain single-task adapter: merge, export as usual
        with torch.no_grad(), tying.adapters(model, tasks[1]):
            alone = torch.allclose(one(x), model(x), atol=1e-5)
        served = base_model()
        tying.load_adapters_(served, {"mt": out})  # every task, as mt/<task>, in one mixed batch
        with torch.no_grad(), tying.adapters(served, [f"mt/{t}" for t in task_of]), tying.adapters(model, task_of):
            mixed = torch.allclose(served(x), model(x), atol=1e-5)
    print(f"task {tasks[1]} loaded alone gives its rows' outputs: {alone}; all tasks served in one batch: {mixed}")
    return {"trainable": counts.trainable, "per_task": counts.per_task, "first": first, "last": last,
            "alone_same": alone, "served_same": mixed}


if __name__ == "__main__":
    main()
