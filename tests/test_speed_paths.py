"""Correctness of the fast paths: the shared down projection (tying/site.py), mixed precision, and
the speed benchmark's code path (cpu stands in for cuda)."""

import copy

import pytest
import torch
from conftest import randomize_bank, tiny_gpt2, tiny_llama

import tying
from tying.engine import wrappers


def _unshare(model):
    """The same model on the plain per-site path (every site computes its own A x)."""
    for _, w in wrappers(model):
        w.share = None
    return model


def _grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    logits.square().mean().backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.tying_bank.named_parameters() if p.requires_grad}


def test_qkv_of_a_layer_share_one_down_projection():
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    shared = {n: w.share for n, w in wrappers(model)}
    for layer in range(3):
        q, k, v = (shared[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv")
        assert q is not None and q is k is v
    assert shared["model.layers.0.self_attn.q_proj"] is not shared["model.layers.1.self_attn.q_proj"]
    gpt2 = tiny_gpt2()  # fused c_attn: one site per layer, nothing to share
    tying.apply_(gpt2, tying.load_spec("tl6", rank=4))
    assert all(w.share is None for _, w in wrappers(gpt2))


def test_no_sharing_with_dropout_or_untied_A():
    spec = tying.load_spec("lora", rank=4).model_dump()
    spec["adapter"]["dropout"] = 0.1  # each site draws its own mask
    model = tiny_llama()
    tying.apply_(model, spec)
    assert all(w.share is None for _, w in wrappers(model))
    spec = tying.load_spec("lora", rank=4).model_dump()
    spec["adapter"]["factors"]["A"]["tie"] = []
    model = tiny_llama()
    tying.apply_(model, spec)
    assert all(w.share is None for _, w in wrappers(model))


@pytest.mark.parametrize("preset", ["lora", "tl6", "tl5", "lotr", "vera"])
def test_shared_path_equals_per_site_path(preset, tokens):
    fast = tiny_llama()
    tying.apply_(fast, tying.load_spec(preset, rank=4))
    randomize_bank(fast)
    plain = _unshare(copy.deepcopy(fast))
    assert any(w.share is not None for _, w in wrappers(fast))
    out_f, g_f = _grads(fast, tokens)
    out_p, g_p = _grads(plain, tokens)
    assert torch.allclose(out_f, out_p, atol=1e-6)
    assert g_f.keys() == g_p.keys() and g_f
    for k in g_f:
        assert torch.allclose(g_f[k], g_p[k], atol=1e-6, rtol=1e-5), k


def test_tied_gradient_is_the_sum_of_the_sites_gradients(tokens):
    """TL6: dL/dA = sum over the 9 sites of diag(u) B^T diag(v) g^T x, from each site's own input and output grad."""
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    seen = []

    def hook(w, args, out):
        out.register_hook(lambda g, w=w, x=args[0]: seen.append((w, x.detach(), g.detach())))

    handles = [w.register_forward_hook(hook) for _, w in wrappers(model)]
    model(input_ids=tokens).logits.square().mean().backward()
    for h in handles:
        h.remove()
    assert len(seen) == 9
    expected = torch.zeros_like(model.tying_bank["A"]["model:layers:*:self_attn:*"])
    for w, x, g in seen:
        u, B, v = w.factor("u"), w.factor("B"), w.factor("v")
        gh = (g.reshape(-1, g.shape[-1]) * v) @ B * u * w.scale  # dL/dh for h = A x, (tokens, r)
        expected += gh.T @ x.reshape(-1, x.shape[-1])
    assert torch.allclose(model.tying_bank["A"]["model:layers:*:self_attn:*"].grad, expected, atol=1e-5, rtol=1e-4)


def test_merged_equals_unmerged_on_the_shared_path(tokens):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    with torch.inference_mode():
        unmerged = model(input_ids=tokens).logits
        tying.merge_(model)
        merged = model(input_ids=tokens).logits
    assert not torch.allclose(unmerged, tiny_llama()(input_ids=tokens).logits, atol=1e-3)  # a real update
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_reuse_only_for_the_same_unchanged_input_and_factors():
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    attn = model.model.layers[0].self_attn
    shared = attn.q_proj.share
    x = torch.randn(2, 5, 32)

    def ref(site):  # the per-site computation, without the cache
        return site.base(x) + site.up(torch.zeros(2, 5, site.base.out_features), site.project(x))
    with torch.no_grad():
        shared.open()  # as the parent's forward pre-hook does
        attn.q_proj(x)
        assert shared.entry is not None and shared.entry[0]() is x
        model.tying_bank["A"]["model:layers:*:self_attn:*"].add_(0.5)  # factors change between siblings
        assert torch.allclose(attn.k_proj(x), ref(attn.k_proj), atol=1e-6)
        attn.q_proj(x)
        x.add_(1.0)  # the input changes in place
        assert torch.allclose(attn.k_proj(x), ref(attn.k_proj), atol=1e-6)
        assert torch.allclose(attn.v_proj(x.clone()), ref(attn.v_proj), atol=1e-6)  # another tensor object
        shared.close()
        h = torch.randn(2, 5, 32)
        model(inputs_embeds=h)  # the parent's hooks open and clear it: nothing outlives the forward
    assert shared.entry is None and shared.depth == 0


def _count_projections(model):
    calls = []
    for _, w in wrappers(model):
        project = w.project
        w.project = lambda *a, project=project: calls.append(1) or project(*a)
    return calls


def test_reuse_happens_inside_the_parents_forward(tokens):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    twin = copy.deepcopy(model)
    calls = _count_projections(model)
    model(input_ids=tokens)
    assert len(calls) == 3  # one A x per layer, not one per q, k and v
    twin_calls = _count_projections(twin)
    twin(input_ids=tokens)  # a copy opens its own groups
    assert len(twin_calls) == 3


def test_reuse_where_the_parent_is_a_plain_container():
    """q, k, v under a ModuleDict whose forward never runs: the root's forward opens the group."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.ModuleDict({p: torch.nn.Linear(8, 8) for p in ("q", "k", "v")})

        def forward(self, x):
            return sum(self.attn[p](x) for p in ("q", "k", "v"))

    net = Net()
    spec = {"targets": [{"select": "attn.{proj:q|k|v}"}], "adapter": {"rank": 2, "factors": {
        "A": {"tie": ["proj"], "init": {"kind": "normal", "seed": 0}}, "B": {"init": {"kind": "normal", "seed": 1}}}}}
    tying.apply_(net, spec)
    calls = _count_projections(net)
    x = torch.randn(3, 8)
    out = net(x)
    assert len(calls) == 1
    plain = _unshare(copy.deepcopy(net))
    assert torch.allclose(out, plain(x), atol=1e-6)


def test_a_copy_or_pickle_of_a_model_mid_forward_starts_empty():
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    attn = model.model.layers[0].self_attn
    attn.q_proj.share.open()
    attn.q_proj(torch.randn(2, 5, 32, requires_grad=True))  # leaves an entry holding a non-leaf h
    assert attn.q_proj.share.entry is not None
    twin = copy.deepcopy(model)  # a non-leaf tensor would make deepcopy raise
    t = twin.model.layers[0].self_attn
    assert t.q_proj.share is t.k_proj.share and t.q_proj.share.entry is None and t.q_proj.share.depth == 0
    assert t.q_proj.share is not attn.q_proj.share
    out = twin(input_ids=torch.tensor([[1, 2, 3]]))  # the copy's hooks drive the copy's cache
    assert out.logits.shape == (1, 3, 100) and t.q_proj.share.entry is None


def test_activation_checkpointing_recomputes_the_same_products(tokens):
    """The cache lives one forward of the parent, so a checkpointed layer's recomputation shares as the first
    pass did (non-reentrant checkpointing compares the saved tensors)."""
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    plain.train()
    out_c, g_c = _grads(model, tokens)
    out_p, g_p = _grads(plain, tokens)
    assert torch.allclose(out_c, out_p, atol=1e-6)
    assert all(torch.allclose(g_c[k], g_p[k], atol=1e-6) for k in g_p)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_bf16_base_with_fp32_factors(make, tokens):
    """A bfloat16 base with float32 factors: bf16-close to float32, float32 gradients, no float32 activations."""
    ref = make()
    tying.apply_(ref, tying.load_spec("tl6", rank=4))
    randomize_bank(ref)
    mixed = make().to(torch.bfloat16)
    tying.apply_(mixed, tying.load_spec("tl6", rank=4), dtype=torch.float32)
    randomize_bank(mixed)
    assert all(p.dtype == torch.float32 for p in mixed.tying_bank.parameters())
    out_r, g_r = _grads(ref, tokens)
    out_m, g_m = _grads(mixed, tokens)
    assert out_m.dtype == torch.bfloat16
    assert (out_m.float() - out_r).abs().max() < 0.05 * out_r.abs().max()
    for k in g_r:
        assert g_m[k].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g_m[k].flatten(), g_r[k].flatten(), dim=0)
        assert cos > 0.99, (k, cos)


def test_speed_benchmark_runs_on_the_device_code_path(tmp_path):
    """`benchmarks/speed.py --device cuda --dtype bfloat16` code path, run on the CPU with tiny models."""
    pytest.importorskip("peft")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_bench", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    res = speed.main(["--device", "cpu", "--dtype", "bfloat16", "--tiny", "--reps", "1", "--block-reps", "2",
                      "--no-extras", "--models", "smollm2-135m", "--out", str(tmp_path)])
    tag = "smollm2-135m-shaped, bfloat16 base + float32 factors"
    train, block = res[f"train {tag}"], res[f"block {tag}"]
    assert set(block["train"]) == {"floor", *speed.TRAIN} and {"floor", "peft-lora", "tying-tl6"} <= set(train)
    assert train["tying-tl6"]["trainable"] < train["peft-lora"]["trainable"]
    for row in [*train.values(), *block["train"].values()]:
        assert row["seconds"]["median"] > 0
    assert "overhead_vs_peft" in train["tying-tl6"] and "overhead_s" not in train["floor"]
    assert block["train"]["tying-tl6"]["composed_overhead_s"] > 0
    assert (tmp_path / "speed.md").read_text().count("| tying-tl6 |") == 3  # one-layer, train and inference rows


def test_inference_adds_in_place_only_where_nothing_else_sees_the_output(tokens):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    with torch.no_grad():
        eager = model(input_ids=tokens).logits
    with torch.inference_mode():
        assert torch.equal(model(input_ids=tokens).logits, eager)
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q.base.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, eager)
    handle.remove()
    x, out = seen[0]
    assert torch.equal(out, q.base(x))  # the hook's tensor is the base's output, not the adapted one
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.append((args[0], out)) if mod is q.base else None)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, eager)
    handle.remove()
    x, out = seen[0]
    assert torch.equal(out, q.base(x))  # a global hook too


def test_low_rank_functions_pass_gradcheck():
    """The hand-written backward of the fast path's products, with u, v and a scale folded in."""
    from tying.update import LowRankDown, LowRankUp

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, A, u = t(6, 5), t(3, 5), t(3)
    assert torch.autograd.gradcheck(LowRankDown.apply, (x, A, u))
    assert torch.autograd.gradcheck(LowRankDown.apply, (x, A, None))
    out, hT, B, v = t(6, 4), t(3, 6), t(4, 3), t(4)
    assert torch.autograd.gradcheck(LowRankUp.apply, (out, hT, B, v, 0.5))
    assert torch.autograd.gradcheck(LowRankUp.apply, (out, hT, B, None, 1.0))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_under_autocast(tokens, checkpointing):
    """bf16 autocast on a float32 model (TRL's and the Trainer's bf16=True on a CPU, with gradient checkpointing):
    the custom backward runs in the dtype of the gradient it gets (before: a dtype mismatch in the backward)."""
    ref = tiny_llama()
    tying.apply_(ref, tying.load_spec("tl6", rank=4))
    randomize_bank(ref)
    auto = copy.deepcopy(ref)
    if checkpointing:
        auto.train()
        auto.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, g_ref = _grads(ref, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only: the backward runs outside, as in Trainer
        loss = auto(input_ids=tokens).logits.float().square().mean()
    loss.backward()
    g_auto = {k: p.grad for k, p in auto.tying_bank.named_parameters() if p.requires_grad}
    for k in g_ref:
        assert g_auto[k].dtype == torch.float32 and torch.isfinite(g_auto[k]).all()
        cos = torch.nn.functional.cosine_similarity(g_auto[k].flatten(), g_ref[k].flatten(), dim=0)
        assert cos > 0.98, (k, cos)


def _tying_calls(fn) -> int:
    """Python functions of tying's own code that ``fn`` runs (deterministic, unlike a timing)."""
    import os
    import sys

    root, calls = os.path.dirname(tying.__file__), [0]

    def tracer(frame, event, arg):
        if frame.f_code.co_filename.startswith(root):
            calls[0] += event == "call"
            return tracer
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return calls[0]


def test_a_plain_site_takes_the_light_path_decided_at_apply_time(tokens):
    """One task, no pools, one process: the forward asks three questions and reads its factors without a branch (at
    most 18 of tying's functions per site, the products included; the general path ran 27); merging, disabling a
    layer, tasks and pools take the general path, decided when they change, never per call."""
    model = tiny_llama().train()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    sites = dict(wrappers(model))
    q = sites["model.layers.0.self_attn.q_proj"]
    assert all(w.light is not None for w in sites.values())
    x = torch.randn(2, 5, 32, requires_grad=True)
    assert _tying_calls(lambda: q(x)) <= 18

    light_out, light_grads = _grads(model, tokens)
    general = copy.deepcopy(model)
    for _, w in wrappers(general):
        w.light = None  # the general path: selection(), factor() per factor
    out, grads = _grads(general, tokens)
    assert torch.equal(out, light_out) and all(torch.equal(grads[k], light_grads[k]) for k in grads)

    tying.merge_(model)
    assert all(w.light is None for w in sites.values())
    tying.unmerge_(model)
    assert all(w.light is not None for w in sites.values())
    q.enable_adapters(False)
    assert q.light is None and torch.equal(q(x), q.base(x))
    q.enable_adapters(True)
    assert q.light is not None

    tasks = tiny_llama()
    tying.apply_(tasks, tying.load_spec("tl6", rank=4).model_copy(update={"tasks": ["a", "b"]}))
    assert all(w.light is None for _, w in wrappers(tasks))
    pooled = tiny_llama()
    tying.apply_(pooled, tying.load_spec("vb-lora", rank=4, num_vectors=32, vector_length=16))
    assert all(w.light is None for _, w in wrappers(pooled))


def test_a_site_pickled_before_the_light_path_unpickles_merged_and_light():
    """A model torch.save'd by an earlier tying (a site's merged flag a plain attribute, no light path) loads with
    that flag and a decided light path: merged stays merged (its forward is the base), an unmerged site is light."""
    import pickle

    from conftest import tiny_llama

    import tying

    model = tiny_llama(layers=2)
    tying.apply_(model, tying.load_spec("lora", rank=4))
    sites = dict(tying.engine.wrappers(model))
    next(iter(sites.values())).merge()
    for w in sites.values():  # the older form of a site's state
        d = w.__dict__
        d["merged"], d["disabled"] = d.pop("_merged", False), d.pop("_disabled", False)
        d.pop("light")
    again = dict(tying.engine.wrappers(pickle.loads(pickle.dumps(model))))
    a, b = again[next(iter(sites))], again[list(sites)[1]]
    assert a.merged and a.light is None and not b.merged and b.light is not None
    assert "merged" not in a.__dict__ and "light" in b.__dict__
