"""tying.integrations.timm: target sets, fused and split qkv, merge, save/load, training; HF ViT; a ResNet."""

import sys

import pytest
import torch
from conftest import randomize_bank, snapshot, tiny_llama
from tying.integrations import timm as tt

import tying

timm = pytest.importorskip("timm")
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer

R = 4


def vit(depth=3, dim=32, seed=0):
    """A random timm ViT on 1x16x16 images: 16 patches, mlp hidden 2 * dim, 3 classes."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=dim, depth=depth,
                             num_heads=4, mlp_ratio=2.0).eval()


def images(n=4, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def expected(preset, L, d, r=R):
    """Hand counts (trainable, frozen) on the fused qkv (d -> 3d) of L blocks; the paper's formulas."""
    return {"lora": (4 * L * d * r, 0), "tl6": (4 * d * r + L * (r + 3 * d), 0), "tl5": (4 * d * r, 0),
            "vera": (L * (r + 3 * d), 4 * d * r), "tied-ABv": (4 * d * r + 3 * L * d, 0)}[preset]


def counts(model, spec):
    c = tying.count(model, spec)
    return c.trainable, c.frozen


@pytest.mark.parametrize("preset", ["lora", "tl6", "tl5", "vera", "tied-ABv"])
def test_counts_fused_and_split(preset):
    model = vit()
    want = expected(preset, 3, 32)
    assert counts(model, tying.load_spec(preset, rank=R)) == want  # the plain preset finds timm's qkv
    assert counts(model, tt.spec(model, preset, rank=R)) == want
    tt.split_qkv_(model)
    # A tied along proj, B and v per slice: the same counts as one 3d x r B and one 3d v
    assert counts(model, tt.spec(model, preset, qkv="split", rank=R)) == want


def test_split_only_configurations():
    """What only the split allows: adapt q and v alone, or share one B among q, k and v."""
    L, d, model = 3, 32, vit()
    tt.split_qkv_(model)
    qv = [{"select": "blocks.{layer:#}.attn.qkv.{proj:q|v}", "types": ["Linear"]}]
    assert counts(model, tying.load_spec("lora", rank=R, targets=qv)) == (L * (R * d + 2 * d * R), 0)
    one_b = tying.load_spec({"targets": tt.targets(model, qkv="split"), "adapter": {"rank": R, "factors": {
        "A": {"tie": ["layer", "proj"], "init": "kaiming_uniform"}, "B": {"tie": ["layer", "proj"], "init": "zeros"}}}})
    assert counts(model, one_b) == (2 * d * R, 0)


def test_target_sets_by_hand():
    L, d, h, model = 3, 32, 64, vit()
    qkv, proj, fc1, fc2 = R * d + 3 * d * R, 2 * d * R, R * d + h * R, R * h + d * R
    want = {"attn_qkv": qkv, "attn": qkv + proj, "mlp": fc1 + fc2, "all_linear": qkv + proj + fc1 + fc2}
    for name, n in want.items():
        assert tying.count(model, tt.spec(model, "lora", name, rank=R)).trainable == L * n, name


def test_spec_for_one_size_applies_to_another(tmp_path):
    small, large = vit(depth=2, dim=32), vit(depth=4, dim=48, seed=1)
    spec = tt.spec(small, "tl6", "attn", rank=R)
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    L, d = 4, 48
    assert counts(large, tying.load_spec(path)) == (4 * d * R + L * (R + 3 * d) + 2 * d * R + L * (R + d), 0)
    tying.apply_(large, tying.load_spec(path))
    assert large(images()).shape == (4, 3)


@pytest.mark.parametrize("qkv", ["fused", "split"])
def test_merged_equals_unmerged(qkv):
    model, x = vit(), images()
    if qkv == "split":
        tt.split_qkv_(model)
    tying.apply_(model, tt.spec(model, "tl6", "all_linear", qkv=qkv, rank=R))
    randomize_bank(model)
    with torch.no_grad():
        a = model(x)
        tying.merge_(model)
        b = model(x)
    assert (a - b).abs().max() < 1e-5 and (a - vit()(x)).abs().max() > 1e-3  # merged, and not a no-op


@pytest.mark.parametrize("qkv", ["fused", "split"])
def test_save_load_round_trip(tmp_path, qkv):
    model, x = vit(), images()
    if qkv == "split":
        tt.split_qkv_(model)
    tying.apply_(model, tt.spec(model, "vera", "all_linear", qkv=qkv, rank=R))
    randomize_bank(model)
    tying.save_adapter(model, tmp_path)
    fresh = vit()
    if qkv == "split":
        tt.split_qkv_(fresh)
    tying.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def _train(model, steps=30, lr=3e-2):
    x, y = images(16), torch.arange(16) % 3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset,qkv", [("lora", "fused"), ("tl6", "fused"), ("tl6", "split"), ("vera", "fused")])
def test_training_reduces_loss(preset, qkv):
    model = vit().train()
    if qkv == "split":
        tt.split_qkv_(model)
    tying.apply_(model, tt.spec(model, preset, "all_linear", qkv=qkv, rank=R))
    frozen_head = model.head.weight.clone()
    losses = _train(model)
    assert losses[-1] < 0.75 * losses[0], losses  # the adapter alone (head frozen) learns 16 random images
    assert torch.equal(model.head.weight, frozen_head)


def test_split_and_fuse_restore_exactly():
    model, x = vit(), images()
    before, qkv0 = snapshot(model), model.blocks[0].attn.qkv
    with torch.no_grad():
        y = model(x)
    assert tt.split_qkv_(model) == 3 and tt.split_qkv_(model) == 0
    assert "blocks.0.attn.qkv.k.weight" in model.state_dict() and "blocks.0.attn.qkv.weight" not in model.state_dict()
    with torch.no_grad():
        assert torch.equal(model(x), y)
    assert tt.fuse_qkv_(model) == 3 and tt.fuse_qkv_(model) == 0
    after = model.state_dict()
    assert model.blocks[0].attn.qkv is qkv0 and list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_split_trains_the_fused_weights():
    """Updates of the slices reach the fused module: full fine-tuning, or a merged adapter."""
    model, x = vit(), images()
    tt.split_qkv_(model)
    with torch.no_grad():
        model.blocks[1].attn.qkv.k.weight.add_(1.0)
    tying.apply_(model, tt.spec(model, "tl6", qkv="split", rank=R))
    randomize_bank(model)
    with torch.no_grad():
        y = model(x)
    with pytest.raises(tying.errors.AlreadyAppliedError, match="unapply"):
        tt.fuse_qkv_(model)
    tying.unapply_(model, merge=True)
    tt.fuse_qkv_(model)
    with torch.no_grad():
        assert (model(x) - y).abs().max() < 1e-5


def test_split_refuses_an_adapted_model():
    model = vit()
    tying.apply_(model, tt.spec(model, "lora", rank=R))
    with pytest.raises(tying.errors.AlreadyAppliedError, match="before split_qkv_"):
        tt.split_qkv_(model)


def test_fuse_after_dtype_change():
    model = vit()
    tt.split_qkv_(model)
    model.double()
    tt.fuse_qkv_(model)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float64
    assert model(images().double()).dtype == torch.float64


def test_errors():
    model = vit()
    with pytest.raises(tying.errors.SelectorError, match="call split_qkv_"):
        tt.targets(model, "attn", qkv="split")
    with pytest.raises(tying.errors.SelectorError, match="unknown target set"):
        tt.targets(model, "everything")
    tt.split_qkv_(model)
    with pytest.raises(tying.errors.SelectorError, match="fuse_qkv_"):
        tt.targets(model, "attn_qkv")
    assert len(tt.targets(model, "mlp")) == 2  # no qkv involved: either form works
    with pytest.raises(tying.errors.SelectorError, match="no timm ViT blocks"):
        tt.targets(tiny_resnet())


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install 'tying\[timm\]'"):
        tt.targets(torch.nn.Linear(2, 2))


def test_transformers_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    L, d, h = 2, 32, 48
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=d, num_hidden_layers=L, num_attention_heads=4, intermediate_size=h, image_size=16,
        patch_size=8, num_labels=3)).eval()
    assert counts(model, tt.hf_vit_spec(model, "tl6", rank=R)) == expected("tl6", L, d)
    assert counts(model, tt.hf_vit_spec(model, "lora", "mlp", rank=R)) == (L * (R * d + h * R + R * h + d * R), 0)
    tying.apply_(model, tt.hf_vit_spec(model, "tl6", "all_linear", rank=R))
    randomize_bank(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x).logits
        tying.merge_(model)
        assert (model(x).logits - a).abs().max() < 1e-5
    with pytest.raises(tying.errors.SelectorError, match="not a ViT"):
        tt.hf_vit_spec(tiny_llama(), "tl6")


def tiny_resnet():
    torch.manual_seed(0)
    return ResNet(BasicBlock, [2, 1, 1, 1], channels=(8, 16, 32, 64), num_classes=3).eval()


def test_resnet_by_selectors():
    """Any timm model: tie A and B of each stage's 3x3 conv2 across the blocks of that stage."""
    model, x = tiny_resnet(), torch.randn(2, 3, 32, 32)
    spec = tying.load_spec({
        "targets": [{"select": "layer{stage:#}.{block:#}.conv2", "types": ["Conv2d"]}],
        "adapter": {"rank": R, "factors": {"A": {"tie": ["block"], "init": {"kind": "kaiming_uniform", "seed": 0}},
                                           "B": {"tie": ["block"], "init": "zeros"}}}})
    plan = tying.plan(model, spec)
    assert len(plan.sites) == 5 and len(plan.groups) == 8  # layer1 has two blocks sharing one A and one B
    assert plan.counts.trainable == sum(R * c * 9 + c * R for c in (8, 16, 32, 64))
    tying.apply_(model, spec)
    randomize_bank(model)
    with torch.no_grad():
        a = model(x)
        tying.merge_(model)
        assert (model(x) - a).abs().max() < 1e-4
