"""examples/: every YAML spec loads, plans to the hand-counted tie groups and parameters on a tiny model,
applies as a zero update that trains exactly its factors (and heads), and every script runs.

Tests that need an extra (timm, transformers, stable-baselines3) skip one by one."""

import functools
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tying

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


pytestmark = pytest.mark.usefixtures("keep_threads")  # the scripts set one thread for their tiny models


@functools.cache
def script(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package), once per session: a script that
    registers a kind or module type holds the classes it registered."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def groups(plan) -> dict[str, int]:
    return {f: row["groups"] for f, row in plan.counts.by_factor.items()}


def check_applied(model, spec, forward, want_trainable: int, want_groups: dict[str, int]) -> None:
    """Plan and apply ``spec``: hand-counted groups and parameters, a zero update at the start, the
    trainable set exactly the trained factors plus train_modules, and a gradient reaching every factor."""
    plan = tying.plan(model, spec)
    assert groups(plan) == want_groups
    assert plan.counts.trainable == want_trainable and plan.counts.frozen == 0
    with torch.no_grad():
        before = forward(model)
    counts = tying.apply_(model, spec)
    assert counts.trainable == want_trainable
    with torch.no_grad():
        assert torch.equal(forward(model), before)  # every example starts as the base model
    bank = dict(tying.bank_of(model).named_parameters())  # the factors and the copies of the train_modules
    assert {k.split(".")[1] for k in bank if k.startswith("trained.")} == {n.replace(".", ":") for n in spec.train_modules}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bank.values()}
    assert sum(p.numel() for p in bank.values()) == want_trainable
    with torch.no_grad():  # give the zero factors a value, so every factor's gradient is non-zero
        for p in bank.values():
            if not p.any():
                p.fill_(0.1)
    forward(model).float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.values())


def test_custom_sharing_spec():
    ex = script("custom_sharing")
    r, d, h, depth = 4, 32, 64, 8
    x = torch.randn(3, d)
    want = r * d + r * h + 2 * (h * r + d * r) + depth * (h + d)  # A: 1 per proj; B: per proj and 4 layers; v: per site
    check_applied(ex.ResidualMLP(depth, d, h), tying.load_spec(ex.SPEC), lambda m: m(x), want, {"A": 2, "B": 4, "v": 16})


def test_cnn_conv_buckets_spec():
    ex = script("cnn_conv_buckets")
    r, c, depth = 4, 8, 6
    x = torch.randn(2, 1, 12, 12)
    want = depth // 2 * (r * c * 9 + c * r) + (c * 4 + 4)  # one conv A and one 1x1 B per pair of layers; classifier
    model = ex.SmallCNN(channels=c, depth=depth).eval()
    check_applied(model, tying.load_spec(ex.SPEC), lambda m: m(x), want, {"A": 3, "B": 3})


def test_cnn_buckets_refuse_mismatched_channels():
    """A bucket whose members differ in channels fails at plan time, naming the members."""
    ex = script("cnn_conv_buckets")
    model = ex.SmallCNN(channels=8)
    model.features[1].conv = torch.nn.Conv2d(8, 8, 5, padding=2)  # layer 1's A would be 4 x 8 x 5 x 5
    with pytest.raises(tying.errors.TieError, match="features.1.conv"):
        tying.plan(model, tying.load_spec(ex.SPEC))


def test_vit_tl6_spec():
    pytest.importorskip("timm")
    ex = script("vit_tl6")
    r, d, depth, classes = 8, 32, 3, 4
    x = torch.randn(2, 1, 28, 28)
    want = 4 * d * r + depth * (r + 3 * d) + (d * classes + classes)  # the paper's TL6 count + the head
    model = ex.build_model(depth=depth, dim=d, classes=classes).eval()
    check_applied(model, tying.load_spec(ex.SPEC), lambda m: m(x), want, {"A": 1, "B": 1, "u": depth, "v": depth})


def test_vit_tl6_spec_equals_the_preset_on_the_fused_qkv():
    """The YAML is the tl6 preset, retargeted to timm's qkv and with the head trained: the same counts."""
    pytest.importorskip("timm")
    from tying.integrations import timm as tt

    ex = script("vit_tl6")
    model = ex.build_model(depth=3, dim=32)
    ours, preset = tying.count(model, ex.SPEC), tying.count(model, tt.spec(model, "tl6", train_modules=["head"]))
    assert (ours.trainable, ours.by_factor) == (preset.trainable, preset.by_factor)


def test_llm_tl6_spec():
    pytest.importorskip("transformers")
    ex = script("llm_tl6")
    r, d, d_kv, layers = 8, 64, 32, 3  # 4 query heads of 16; 2 key/value heads: k and v are 32 wide
    ids = torch.randint(0, 128, (2, 6))
    want = r * d + (d + 2 * d_kv) * r + layers * (r + d + 2 * d_kv)
    model = ex.build_model(layers=layers).eval()
    check_applied(model, tying.load_spec(ex.SPEC), lambda m: m(ids).logits, want,
                  {"A": 1, "B": 3, "u": layers, "v": 3 * layers})
    model = ex.build_model(layers=layers)  # the YAML spells out the tl6 preset on Llama's names
    ours, preset = tying.count(model, ex.SPEC), tying.count(model, "tl6")
    assert (ours.trainable, ours.by_factor) == (preset.trainable, preset.by_factor)


def test_ppo_policy_spec():
    pytest.importorskip("stable_baselines3")
    import gymnasium as gym

    ex = script("ppo_policy")
    model = ex.build_model(gym.make("CartPole-v1"))
    r, obs, w, actions = 4, 4, 64, 2
    # A: one per input width (obs, 64) shared by actor and critic; B: one per body; u: per layer; v: per site
    want = r * obs + r * w + 2 * w * r + 2 * r + 4 * w + (w * actions + actions) + (w + 1)
    x = torch.randn(3, obs)
    check_applied(model.policy, tying.load_spec(ex.SPEC),
                  lambda pol: torch.cat([pol.predict_values(x), pol.get_distribution(x).distribution.logits], -1),
                  want, {"A": 2, "B": 2, "u": 2, "v": 4})


def test_ppo_policy_spec_is_strict_without_shape_aware():
    """Without shape_aware, tying A across the obs-wide and the 64-wide layers is a clear error."""
    pytest.importorskip("stable_baselines3")
    import gymnasium as gym

    ex = script("ppo_policy")
    data = tying.load_spec(ex.SPEC).model_dump(mode="json")
    data["adapter"]["factors"]["A"]["shape_aware"] = False
    with pytest.raises(tying.errors.TieError, match="shape_aware"):
        tying.plan(ex.build_model(gym.make("CartPole-v1")).policy, tying.load_spec(data))


def test_custom_kind_spec():
    """A kind (bitfit) and a module type (KernelLinear) registered from outside: the YAML plans to the hand count."""
    ex = script("custom_kind")
    ex.register()
    depth, d, h = 4, 16, 32
    x = torch.randn(3, d)
    check_applied(ex.Net(depth, d, h), tying.load_spec(ex.SPEC), lambda m: m(x), h + d, {"b": 2})


@pytest.mark.parametrize("name, trained", [("multitask_tl6", "ABuv"), ("multitask_vera", "uv")])
def test_multitask_specs_on_a_llama(name, trained):
    """TL6 and VeRA-like across tasks, on a tiny Llama: the hand count, a zero start for every task, and in a mixed
    batch a gradient on every trained factor (each task's own and the shared ones)."""
    from conftest import tiny_llama

    spec = tying.load_spec(EXAMPLES / f"{name}.yaml")
    L, r, d, d_kv, T = 2, 8, 32, 16, 3
    outs = d + 2 * d_kv
    sizes = {"A": r * d, "B": outs * r, "u": L * T * r, "v": L * T * outs}
    model = tiny_llama(layers=L)
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    counts = tying.apply_(model, spec)
    assert counts.trainable == sum(sizes[f] for f in trained)
    assert counts.frozen == sum(n for f, n in sizes.items() if f not in trained)
    assert counts.per_task == L * r * ("u" in trained) + L * outs
    with torch.no_grad():
        for t in spec.tasks:
            with tying.adapters(model, t):
                assert torch.equal(model(ids).logits, before)
        for p in tying.bank_of(model).parameters():
            p.add_(0.1) if not p.any() else None
    with tying.adapters(model, spec.tasks):
        model(ids).logits.pow(2).sum().backward()
    assert all((p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad
               for p in tying.bank_of(model).parameters())


# ---- the scripts themselves, at small budgets (the default budgets run in the slow test below)


def test_custom_sharing_script_trains_and_reloads():
    out = script("custom_sharing").main(["--steps", "30"])
    assert out["reload_same"] and out["loss_last"] < out["loss_first"]


def test_custom_kind_script_trains_saves_loads_and_merges():
    out = script("custom_kind").main(["--steps", "40"])
    assert out["bitfit_reload_same"] and out["bitfit_merged_same"] and out["tl6_merged_same"]
    assert out["bitfit_last"] < out["bitfit_first"] and out["tl6_last"] < out["tl6_first"]


def test_multitask_script_trains_every_task_and_serves_them_together():
    out = script("multitask_tl6").main(["--steps", "40"])
    assert out["alone_same"] and out["served_same"]
    assert all(out["last"][t] < 0.5 * out["first"][t] for t in out["first"])


def test_cnn_script_trains_merges_and_reloads():
    out = script("cnn_conv_buckets").main(["--steps", "30"])
    assert out["reload_same"] and out["merged_same"] and out["accuracy"] > 0.5  # 4 classes: chance is 0.25


def test_vit_script_trains_and_reloads():
    pytest.importorskip("timm")
    out = script("vit_tl6").main(["--steps", "25"])
    assert out["reload_same"] and out["acc_after"] > out["acc_before"] + 0.2


def test_llm_script_trains_merges_and_reloads():
    pytest.importorskip("transformers")
    out = script("llm_tl6").main(["--steps", "15"])
    assert out["reload_same"] and out["merged_same"] and out["loss_last"] < out["loss_first"]


def test_ppo_script_adapts_saves_and_reloads():
    pytest.importorskip("stable_baselines3")
    out = script("ppo_policy").main(["--pretrain", "512", "--adapt", "512"])
    assert out["reload_same"] and out["trainable"] == 1243


@pytest.mark.slow
@pytest.mark.parametrize("name", ["custom_sharing", "custom_kind", "cnn_conv_buckets", "vit_tl6", "llm_tl6",
                                  "ppo_policy"])
def test_script_runs_under_a_minute(name):
    extra = {"vit_tl6": "timm", "llm_tl6": "transformers", "ppo_policy": "stable_baselines3"}.get(name)
    if extra:
        pytest.importorskip(extra)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], check=True, timeout=60, capture_output=True)
    assert time.perf_counter() - start < 60
