"""TL6 on the fused qkv of a timm ViT with the head trained (vit_tl6.yaml). Needs `pip install -e ".[timm]"`.

To run offline in seconds, a small random ViT stands in for a pretrained backbone and the task is
synthetic (the direction of the stripes in a noisy image). With a real backbone, swap in e.g.
``timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=4)``: the spec names no size.

    python examples/vit_tl6.py [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tying

SPEC = Path(__file__).with_suffix(".yaml")


def build_model(depth: int = 6, dim: int = 64, classes: int = 4, seed: int = 0) -> VisionTransformer:
    """A small timm ViT on 1 x 28 x 28 images (patch 7: 16 patches), the shape of benchmarks/vision.py's."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=classes, embed_dim=dim,
                             depth=depth, num_heads=4)


def stripe_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy stripes, horizontal, vertical or along one of the two diagonals (the label), random phase."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    i, j = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    direction = torch.stack([i, j, i + j, i - j])[y]  # n x 28 x 28
    phase = torch.rand(n, 1, 1, generator=g) * 6.3
    x = torch.sin(direction * 1.2 + phase) + torch.randn(n, 28, 28, generator=g)
    return x.unsqueeze(1), y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(-1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    model = build_model()
    x_test, y_test = stripe_images(256, seed=1)

    spec = tying.load_spec(SPEC)
    print(tying.plan(model, spec).summary())
    counts = tying.apply_(model, spec)  # base frozen; A, B, u, v and the head trained
    print(f"trainable {counts.trainable:,} of which head {counts.modules:,}; by factor {dict(counts.by_factor)}")
    before = accuracy(model, x_test, y_test)

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-2)
    model.train()
    for step in range(args.steps):
        x, y = stripe_images(args.batch, seed=100 + step)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = accuracy(model, x_test, y_test)
    print(f"test accuracy {before:.3f} -> {after:.3f} after {args.steps} steps")

    with tempfile.TemporaryDirectory() as out:  # spec.yaml + adapter.safetensors (factors + head)
        tying.save_adapter(model, out)
        fresh = build_model()  # the same random backbone stands in for reloading the pretrained one
        tying.load_adapter(fresh, out, replace_modules=True)  # our own folder: its head may replace the model's
        same = torch.allclose(fresh.eval()(x_test), model.eval()(x_test), atol=1e-5)
    print(f"reloaded adapter gives the same outputs: {same}")
    return {"trainable": counts.trainable, "acc_before": before, "acc_after": after, "reload_same": same}


if __name__ == "__main__":
    main()
