"""Extending tying from outside: a module type (a user's own linear layer with another weight layout) and an
adapter kind (BitFit: a learned output offset), registered here without touching tying/, applied from YAML,
trained, saved, loaded and merged; then a built-in kind (TL6-style LoRA) on the same custom layers.
Needs only the core (`pip install -e .`).

    python examples/custom_kind.py [--steps 150]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import tying
from tying.errors import NotMergeableError
from tying.modtypes import LINEAR_LIKE
from tying.site import SiteAdapter

SPEC = Path(__file__).with_suffix(".yaml")


class KernelLinear(nn.Module):
    """y = x @ kernel + bias, with ``kernel`` stored (d_in, d_out): not an nn.Linear, so tying needs to be told."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.kernel + self.bias


class BitFit(SiteAdapter):
    """out + b: one learned offset per output feature (shared along the spec's ties)."""

    shares_down = False

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        return out if self.bypass else out + self.factor("b").to(out.dtype)  # merged or disabled: the base alone

    def check_merge(self, sign: int, dequantize: bool = False) -> None:
        if getattr(self.base, "bias", None) is None:
            raise NotMergeableError("bitfit merges into the base's bias, and this module has none")

    def merge(self, sign: int = 1) -> None:
        with torch.no_grad():
            self.base.bias.add_(self.factor("b").to(self.base.bias.dtype), alpha=sign)
        self.merged = sign > 0


def register() -> None:
    """Register KernelLinear and bitfit (once per process; registering a name twice is an error)."""
    if "KernelLinear" not in tying.vocab.module_type_names():
        # the Linear-like products (down, up) apply as they are; only the sizes and the weight's layout differ
        tying.register_module_type("KernelLinear", KernelLinear, dims=lambda m: tuple(m.kernel.shape),
                                   weight=lambda m: m.kernel.T, **LINEAR_LIKE)
    if "bitfit" not in tying.vocab.kind_names():
        tying.register_kind("bitfit", wrapper=BitFit, factors={"b": ("d_out",)}, required=("b",), rank_limit=(),
                            needs={"out_last"})


class Net(nn.Module):
    def __init__(self, depth: int = 4, d: int = 16, h: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": KernelLinear(d, h), "fc2": KernelLinear(h, d)})
                                    for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](torch.tanh(b["fc1"](x)))
        return x


def fit(model, x, y, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    register()
    torch.manual_seed(0)
    model, x = Net(), torch.randn(128, 16)
    with torch.no_grad():  # the task: the base's output, shifted and slightly rotated
        y = model(x) @ (torch.eye(16) + 0.05 * torch.randn(16, 16)) + 0.5
    start = Net()
    start.load_state_dict(model.state_dict())

    spec = tying.load_spec(SPEC)
    print(tying.plan(model, spec).summary())  # 8 KernelLinear sites; b: one group for fc1, one for fc2
    counts = tying.apply_(model, spec)
    bitfit = fit(model, x, y, args.steps, 5e-2)
    print(f"bitfit: {counts.trainable} trainable, loss {bitfit[0]:.4f} -> {bitfit[-1]:.4f}")
    out = {"bitfit_trainable": counts.trainable, "bitfit_first": bitfit[0], "bitfit_last": bitfit[-1]}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tying.save_adapter(model, tmp)
        fresh = Net()
        fresh.load_state_dict(start.state_dict())
        tying.load_adapter(fresh, tmp)
        out["bitfit_reload_same"] = torch.equal(fresh(x), model(x))
        ref = model(x)
        tying.merge_(model)
        out["bitfit_merged_same"] = torch.allclose(model(x), ref, atol=1e-5)
        tying.unapply_(model, merge=False)

    lora = {"targets": spec.model_dump()["targets"], "adapter": {"rank": 4, "factors": {  # TL6-style on the same
        "A": {"tie": ["layer", "proj"], "init": {"kind": "kaiming_uniform", "seed": 0}, "shape_aware": True},
        "B": {"tie": ["layer"], "init": {"kind": "kaiming_uniform", "seed": 1}},
        "u": {"tie": ["proj"], "init": "ones"}, "v": {"tie": [], "init": "zeros"}}}}
    counts = tying.apply_(model, lora)
    tl6 = fit(model, x, y, args.steps, 1e-2)
    print(f"tl6 on KernelLinear: {counts.trainable} trainable, loss {tl6[0]:.4f} -> {tl6[-1]:.4f}")
    with torch.no_grad():
        ref = model(x)
        tying.merge_(model)  # through KernelLinear's weight view: the kernel itself changes
        out.update(tl6_first=tl6[0], tl6_last=tl6[-1], tl6_merged_same=torch.allclose(model(x), ref, atol=1e-5))
    return out


if __name__ == "__main__":
    print(main())
