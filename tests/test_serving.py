"""Mixed-batch serving of many adapters (issue 18): the contract is that every row of a mixed batch equals
that row on a fresh base with only its adapter loaded by tying.load_adapter (rows named None: the base)."""

import pytest
import torch
from conftest import TINY, tiny_gpt2, tiny_llama

import tying
from tying import errors, serving

PRESETS = [("tl6", 8), ("lora", 4), ("vera", 8), ("tl5", 2), ("ia3", 1), ("sharelora-A", 8), ("lora-group4", 8),
           ("lotr", 4), ("tied-Buv", 16)]


def _randomize_trained(model, seed):
    """Random values for the trained factors only: frozen seeded factors keep their shared starting values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tying_bank.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _save(tmp_path, family, preset, rank, seed, **overrides):
    model = TINY[family]()
    tying.apply_(model, tying.load_spec(preset, rank=rank, **overrides))
    _randomize_trained(model, seed)
    return tying.save_adapter(model, tmp_path / f"{family}-{preset}-{rank}-{seed}-{len(list(tmp_path.iterdir()))}")


def _reference(family, folder, ids):
    """Logits of ``ids`` on a fresh base with only the adapter ``folder`` (None: no adapter)."""
    model = TINY[family]()
    if folder is not None:
        tying.load_adapter(model, folder)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return {family: {f"{p}-{r}": _save(tmp, family, p, r, seed) for seed, (p, r) in enumerate(PRESETS, 1)}
            for family in TINY}


@pytest.mark.parametrize("family", sorted(TINY))
def test_mixed_batch_rows_equal_single_adapter_models(family, folders):
    ads = folders[family]
    model = TINY[family]()
    tying.load_adapters_(model, ads)
    names = [*ads, None, "tl6-8", None, "lora-4"]
    ids = torch.randint(0, 100, (len(names), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tying.adapters(model, names):
        out = model(ids).logits
    base = _reference(family, None, ids)
    for i, name in enumerate(names):
        ref = base[i] if name is None else _reference(family, ads[name], ids[i:i + 1])[0]
        assert (out[i] - ref).abs().max().item() < 1e-5, (name, (out[i] - ref).abs().max().item())
        if name is not None:  # the adapter changes the output, so the test could fail
            assert not torch.allclose(ref, base[i], atol=1e-4)
    with torch.no_grad():  # outside a block: the base model
        assert torch.equal(model(ids).logits, base)


def test_ties_are_kept_and_equal_frozen_factors_are_stored_once(tmp_path):
    ads = {f"v{i}": _save(tmp_path, "llama", "vera", 8, i) for i in range(3)}
    ads["t"] = _save(tmp_path, "llama", "tl6", 8, 9)
    model = tiny_llama()
    tying.load_adapters_(model, ads)
    bank = model.tying_serving
    # vera: A (tied over layers and q/k/v) and B (tied over layers) once for all three; tl6: its own A, B
    assert bank.stack("A32").shape[0] == 2
    assert bank.stack("B32").shape[0] == 2 and bank.stack("B16").shape[0] == 2 * 2  # k and v groups
    per_layer_u = 3  # vera and tl6 train u per layer: 4 adapters x 3 layers + the neutral entry
    assert bank.stack("u").shape[0] == 4 * per_layer_u + 1
    with tying.adapters(model, ["v0", "v1", "v2", None]):
        route = bank.hooked["model.layers.0.self_attn.q_proj"].route
        assert route.A.ndim == 2  # one `A x` for the whole batch
    with tying.adapters(model, ["v0", "t"]):
        route = bank.hooked["model.layers.0.self_attn.q_proj"].route
        assert route.A.ndim == 3  # one A per row, gathered once for every site that ties it
        assert route.A is bank.hooked["model.layers.2.self_attn.v_proj"].route.A
    ids = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), tying.adapters(model, ["v2", "t", "v0", "v1"]):
        out = model(ids).logits
    for i, name in enumerate(["v2", "t", "v0", "v1"]):
        assert (out[i] - _reference("llama", ads[name], ids[i:i + 1])[0]).abs().max() < 1e-5


def test_resident_memory_counts_each_tie_group_once(tmp_path):
    model = tiny_llama()
    tying.load_adapters_(model, {"t": _save(tmp_path, "llama", "tl6", 8, 1)})
    one = serving.resident_bytes(model)
    tying.load_adapters_(model, {"l": _save(tmp_path, "llama", "lora", 8, 2)})
    lora = serving.resident_bytes(model) - one
    tl6_counts = tying.count(tiny_llama(), tying.load_spec("tl6", rank=8))
    lora_counts = tying.count(tiny_llama(), tying.load_spec("lora", rank=8))
    table = 9 * 7 * 4  # 9 sites x 7 roles, int32
    assert lora == lora_counts.trainable * 4 + table
    assert one <= (tl6_counts.trainable + 8 + 32 + 16) * 4 + table  # + the neutral u and v entries


def test_generate_with_kv_cache_keeps_rows_on_their_adapters(folders):
    ads = folders["llama"]
    names = ["tl6-8", None, "vera-8", "lora-4"]
    ids = torch.randint(1, 100, (4, 5), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    model = tiny_llama()
    tying.load_adapters_(model, ads)
    with torch.inference_mode(), tying.adapters(model, names):
        out = model.generate(ids, **kw)
    for i, name in enumerate(names):
        ref = tiny_llama()
        if name is not None:
            tying.load_adapter(ref, ads[name])
        with torch.no_grad():
            assert torch.equal(out[i], ref.generate(ids[i:i + 1], **kw)[0]), name
    # beam search runs num_beams rows per input: the names must say so
    with tying.adapters(model, names), pytest.raises(errors.ServingError, match="repeat each name"):
        model.generate(ids, num_beams=2, **kw)
    with torch.no_grad(), tying.adapters(model, [n for n in names for _ in range(2)]):
        beams = model.generate(ids, num_beams=2, **kw)
    ref = tiny_llama()
    tying.load_adapter(ref, ads["vera-8"])
    with torch.no_grad():
        assert torch.equal(beams[2], ref.generate(ids[2:3], num_beams=2, **kw)[0])


def test_bfloat16(folders):
    ads = folders["gpt2"]
    model = tiny_gpt2().to(torch.bfloat16)
    tying.load_adapters_(model, {k: ads[k] for k in ("tl6-8", "ia3-1")})
    assert all(b.dtype == torch.bfloat16 for b in model.tying_serving.buffers())
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), tying.adapters(model, ["tl6-8", None, "ia3-1"]):
        out = model(ids).logits.float()
        assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (3, 8)
    for i, name in enumerate(["tl6-8", None, "ia3-1"]):
        ref = _reference("gpt2", None if name is None else ads[name], ids[i:i + 1])[0]
        assert (out[i] - ref).abs().max() < 0.1 * ref.abs().max()


def test_load_and_unload_while_serving_leave_other_adapters_unchanged(folders):
    ads = folders["llama"]
    model = tiny_llama()
    keys = list(model.state_dict())
    tying.load_adapters_(model, {"a": ads["tl6-8"], "b": ads["vera-8"]})
    assert list(model.state_dict()) == keys  # the base's checkpoint keys are untouched
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(4))

    def run(names=("a", "b")):
        with torch.no_grad(), tying.adapters(model, names):
            return model(ids).logits

    before, mem = run(), serving.resident_bytes(model)
    tying.load_adapters_(model, {"c": ads["lotr-4"], "d": ads["tied-Buv-16"]})  # a larger rank pads everyone
    assert torch.allclose(run(), before, atol=1e-6)
    with tying.adapters(model, ["a", "b"]):  # unloading while other rows are being served re-routes them
        tying.unload_adapter_(model, "d")
        tying.unload_adapter_(model, "c")
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, before, atol=1e-6)
    assert serving.served(model) == ["a", "b"] and serving.resident_bytes(model) == mem
    tying.unload_adapter_(model, "a")
    assert torch.allclose(run([None, "b"])[1], before[1], atol=1e-6)
    tying.unload_adapter_(model, "b")
    assert not hasattr(model, "tying_serving")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    tying.apply_(model, tying.load_spec("tl6"))  # a plain base again


def test_nested_blocks_restore_the_outer_routing(folders):
    ads = folders["llama"]
    model = tiny_llama()
    tying.load_adapters_(model, {"a": ads["tl6-8"], "b": ads["lora-4"]})
    ids = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), tying.adapters(model, ["a", "b"]):
        first = model(ids).logits
        with tying.adapters(model, ["b", None, "a"]):
            model(torch.cat([ids, ids[:1]]))
        assert torch.equal(model(ids).logits, first)


def _state(model):
    bank = model.tying_serving
    return serving.served(model), {k: v.clone() for k, v in bank.named_buffers()}


def _unchanged(model, state) -> bool:
    names, buffers = state
    now = dict(model.tying_serving.named_buffers())
    return serving.served(model) == names and now.keys() == buffers.keys() and all(
        torch.equal(now[k], buffers[k]) for k in now)


def test_bad_input_is_refused_before_anything_changes(tmp_path, folders):
    ads = folders["llama"]
    model = tiny_llama()
    tying.load_adapters_(model, {"a": ads["tl6-8"]})
    state = _state(model)
    q_only = [{"select": "re:model.layers.(?P<layer>\\d+).self_attn.(?P<proj>q_proj)"}]
    bad = {
        "other-sites": (_save(tmp_path, "llama", "tl6", 8, 1, targets=q_only), errors.ServingError, "other modules"),
        "bneck": (_save(tmp_path, "llama", "bottleneck", 4, 1), errors.ServingError, "bottleneck adapter"),
        "prefix": (_save(tmp_path, "llama", "prefix", 2, 1), errors.ServingError, "prefix adapter"),
        "trains-norm": (_save(tmp_path, "llama", "tl6", 8, 1, train_modules=["model.norm"]), errors.ServingError,
                        "train_modules|trains whole"),
        "gpt2-file": (folders["gpt2"]["tl6-8"], errors.AdapterFileError, "does not fit"),
        "a": (ads["lora-4"], errors.ServingError, "loaded already"),
        "missing": (tmp_path / "nowhere", errors.AdapterFileError, "not found"),
    }
    for name, (folder, err, msg) in bad.items():
        with pytest.raises(err, match=msg) as info:
            tying.load_adapters_(model, {"ok": ads["lora-4"], name: folder})  # "ok" is not loaded either
        assert repr(name) in str(info.value) and _unchanged(model, state), name
    for names, msg in ((["a", "carol"], "'carol' \\(row 1\\) is not loaded"), ("a", "one adapter name"),
                       ([], "non-empty")):
        with pytest.raises(errors.ServingError, match=msg), tying.adapters(model, names):
            pass
        assert model.tying_serving.active is None
    ids = torch.randint(0, 100, (3, 4))
    with tying.adapters(model, ["a", None]), pytest.raises(errors.ServingError, match="3 rows .* 2 names"):
        model(ids)
    with pytest.raises(errors.ServingError, match="'zed' is not loaded"):
        tying.unload_adapter_(model, "zed")
    with tying.adapters(model, ["a"]), pytest.raises(errors.ServingError, match="'a' serves rows"):
        tying.unload_adapter_(model, "a")
    assert _unchanged(model, state)


def test_merged_or_adapted_model_is_refused(folders):
    model = tiny_llama()
    tying.load_adapter(model, folders["llama"]["tl6-8"])
    tying.merge_(model)
    with pytest.raises(errors.AlreadyAppliedError, match="merged into its base weights"):
        tying.load_adapters_(model, {"a": folders["llama"]["lora-4"]})
    assert not hasattr(model, "tying_serving")
    with pytest.raises(errors.NotAppliedError, match="serves no adapters"), tying.adapters(tiny_llama(), ["a"]):
        pass


class _CountCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_forward_work_does_not_grow_with_the_number_of_adapters_in_the_batch(folders):
    ads = folders["llama"]
    model = tiny_llama()
    tying.load_adapters_(model, ads)
    ids = torch.randint(0, 100, (8, 4), generator=torch.Generator().manual_seed(6))
    calls = []
    lora_family = [k for k in ads if not k.startswith("ia3")]  # IA3 rows add their input and output scaling
    for names in (["tl6-8", "lora-4"] * 4, lora_family):  # 2 and 8 distinct adapters (A differs in both)
        with torch.no_grad(), tying.adapters(model, names), _CountCalls() as counter:
            model(ids)
        calls.append(counter.calls)
    assert calls[0] == calls[1]
