"""LoRA on a CNN's convolutions, tied inside buckets of 2 layers (cnn_conv_buckets.yaml). Core only.

A small random CNN stands in for a pretrained one; the task is synthetic (the direction of the stripes
in a noisy image). For a timm or torchvision ResNet, write the selector over its names instead, e.g.
``layer{stage:#}.{block:#}.conv{proj:1|2}``.

    python examples/cnn_conv_buckets.py [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import tying

SPEC = Path(__file__).with_suffix(".yaml")


class ConvBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.norm(self.conv(x)))


class SmallCNN(nn.Module):
    """stem (1 -> c), ``features.0`` ... ``features.5`` (c -> c, 3 x 3), global pooling, ``classifier``."""

    def __init__(self, channels: int = 16, depth: int = 6, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.features = nn.Sequential(*(ConvBlock(channels) for _ in range(depth)))
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x):
        return self.classifier(self.features(self.stem(x)).mean(dim=(2, 3)))


def stripe_images(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy stripes, horizontal, vertical or along one of the two diagonals (the label), random phase."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    i, j = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 6.3
    x = torch.sin(torch.stack([i, j, i + j, i - j])[y] * 1.2 + phase) + torch.randn(n, size, size, generator=g)
    return x.unsqueeze(1), y


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    torch.manual_seed(0)
    model = SmallCNN().eval()  # eval: BatchNorm keeps the base's running statistics (they are base state)

    spec = tying.load_spec(SPEC)
    print(tying.plan(model, spec).summary())  # 6 sites; A and B: 3 groups each (layers 0-1, 2-3, 4-5)
    counts = tying.apply_(model, spec)
    print(f"trainable {counts.trainable:,} (classifier {counts.modules:,})")

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    x_test, y_test = stripe_images(256, seed=1)
    for step in range(args.steps):
        x, y = stripe_images(32, seed=100 + step)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"test accuracy after {args.steps} steps: {acc:.3f}")

    with tempfile.TemporaryDirectory() as out:
        tying.save_adapter(model, out)
        torch.manual_seed(0)
        fresh = SmallCNN().eval()  # the same base (same seed)
        tying.load_adapter(fresh, out, replace_modules=True)  # our own folder: its classifier may load
        with torch.no_grad():
            same = torch.allclose(fresh(x_test), model(x_test), atol=1e-5)
        tying.merge_(fresh)  # a conv adapter merges into the base kernel too
        with torch.no_grad():
            merged_same = torch.allclose(fresh(x_test), model(x_test), atol=1e-4)
    print(f"reloaded adapter gives the same outputs: {same}; merged: {merged_same}")
    return {"trainable": counts.trainable, "accuracy": acc, "reload_same": same, "merged_same": merged_same}


if __name__ == "__main__":
    main()
