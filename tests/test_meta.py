"""Issue 36.2: apply_ and load_adapter on a model built on the meta device, so that a large base is never held twice;
the factors take their spec's initial values when the base arrives; apply_ on a real model adds the adapter alone."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_bank

import tying
from tying.errors import MetaDeviceError

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

CFG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "intermediate_size": 64, "vocab_size": 100, "tie_word_embeddings": False}
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def spec(**kw):
    return tying.load_spec("tl6", rank=4, **kw)


def real(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()


def on_meta():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()


def base_state(model) -> dict[str, torch.Tensor]:
    """The base's state_dict with its non-persistent buffers (the rotary inv_freq, which a state_dict leaves out)."""
    return {**model.state_dict(), **dict(model.named_buffers())}


def set_buffers(model, state) -> None:
    """The non-persistent buffers, set as transformers' loading computes them."""
    for name, _ in list(model.named_buffers()):
        if name in state and name not in model.state_dict():
            parent, _, attr = name.rpartition(".")
            model.get_submodule(parent)._buffers[attr] = state[name].clone()


def load_base(model, state, how: str):
    """Give a meta model the base's values the ways users do."""
    if how != "assign":
        model.to_empty(device="cpu")
    persistent = {k: v for k, v in state.items() if "rotary_emb" not in k}
    out = model.load_state_dict(persistent, assign=how != "copy")
    assert not out.missing_keys and not out.unexpected_keys
    set_buffers(model, state)
    return model


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def reference(s):
    """apply_ on a real model: what the meta path must give."""
    ref = real()
    tying.apply_(ref, s)
    return ref


@pytest.mark.parametrize("how", ["copy", "to_empty+assign", "assign"])
def test_apply_on_meta_then_load_gives_the_spec_initial_values(how, one_thread):
    s = spec(train_modules=["lm_head"])
    ref = reference(s)
    m = on_meta()
    counts = tying.apply_(m, s)
    assert counts == tying.plan(real(), s).counts
    bank = tying.bank_of(m)
    assert all(t.is_meta for t in bank.parameters())  # nothing allocated for the adapter either
    load_base(m, base_state(real()), how)
    assert bank.state.unset is None and not any(t.is_meta for t in m.parameters())
    assert same(bank.state_dict(), tying.bank_of(ref).state_dict())  # factors (seeded) and the trained lm_head copy
    assert torch.equal(m(IDS).logits, ref(IDS).logits)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [n for n, p in ref.named_parameters()
                                                                         if p.requires_grad]


def test_meta_factors_refuse_forward_save_and_merge_and_change_nothing(tmp_path, one_thread):
    m = on_meta()
    tying.apply_(m, spec())
    for call, what in ((lambda: m(IDS), "forward"), (lambda: tying.save_adapter(m, tmp_path / "a"), "save_adapter"),
                       (lambda: tying.merge_(m), "merge_")):
        with pytest.raises(MetaDeviceError, match=f"{what}: the adapter's factors \\(tying_bank\\) are on the meta "
                                                  "device.*load_state_dict"):
            call()
    assert not (tmp_path / "a").exists() and not tying.bank_of(m).state.merged
    m.to_empty(device="cpu")  # materialised, but no values yet: still refused
    with pytest.raises(MetaDeviceError, match="were materialised by to_empty and hold no values yet"):
        m(IDS)
    load_base(m, base_state(real()), "copy")
    assert torch.equal(m(IDS).logits, reference(spec())(IDS).logits)


def test_load_adapter_into_a_meta_model_then_materialised(tmp_path, one_thread):
    s = spec(train_modules=["lm_head"])
    src = real()
    tying.apply_(src, s)
    randomize_bank(src, seed=3)
    tying.save_adapter(src, tmp_path / "a")
    want = tying.bank_of(src).state_dict()
    # load_adapter while the base is on meta: the file's values wait for it (adapter-sized), then are set
    m = on_meta()
    tying.load_adapter(m, tmp_path / "a", replace_modules=True)
    assert all(t.is_meta for t in tying.bank_of(m).parameters())
    load_base(m, base_state(real()), "assign")
    assert same(tying.bank_of(m).state_dict(), want)
    assert torch.allclose(m(IDS).logits, src(IDS).logits, atol=1e-6)
    # apply_ on meta, the base loaded, then load_adapter: the usual load
    m2 = on_meta()
    tying.apply_(m2, s)
    load_base(m2, base_state(real()), "copy")
    tying.load_adapter(m2, tmp_path / "a", replace_modules=True)
    assert same(tying.bank_of(m2).state_dict(), want)


def test_a_full_checkpoint_with_factors_loads_them(one_thread):
    src = reference(spec())
    randomize_bank(src, seed=5)
    m = on_meta()
    tying.apply_(m, spec())
    out = m.load_state_dict(src.state_dict(), assign=True)
    assert not out.missing_keys and not out.unexpected_keys
    assert same(tying.bank_of(m).state_dict(), tying.bank_of(src).state_dict())


def test_materialize_after_loading_without_load_state_dict(one_thread):
    """accelerate's per-tensor loading runs no load_state_dict hook: materialize_ gives the factors their values."""
    accelerate_utils = pytest.importorskip("accelerate.utils")
    s = spec(train_modules=["lm_head"])
    m = on_meta()
    tying.apply_(m, s)
    with pytest.raises(MetaDeviceError, match="materialize_: the base modules .* are still on the meta device"):
        tying.materialize_(m)
    state = base_state(real())
    for name, _ in [*m.named_parameters(), *m.named_buffers()]:
        if not name.startswith("tying_bank."):
            logical = name.replace(".base.", ".")
            accelerate_utils.set_module_tensor_to_device(m, name, "cpu", value=state[logical])
    with pytest.raises(MetaDeviceError, match="on the meta device"):
        m(IDS)
    tying.materialize_(m)
    ref = reference(s)
    assert same(tying.bank_of(m).state_dict(), tying.bank_of(ref).state_dict())
    assert torch.equal(m(IDS).logits, ref(IDS).logits)
    tying.materialize_(m)  # nothing waits: nothing changes
    assert same(tying.bank_of(m).state_dict(), tying.bank_of(ref).state_dict())


def storages(model) -> dict[int, int]:
    """data pointer -> bytes of every storage the model's parameters and buffers use."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (*model.parameters(), *model.buffers())}


@pytest.mark.parametrize("load", [{"low_cpu_mem_usage": True}, {"device_map": "cpu"}])
def test_transformers_low_memory_loading_then_apply_adds_the_adapter_alone(tmp_path, load, one_thread):
    pytest.importorskip("accelerate")
    s = spec(train_modules=["lm_head"])
    real().save_pretrained(tmp_path / "base")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, **load).eval()
    before = storages(m)
    tying.apply_(m, s)
    after = storages(m)
    bank = tying.bank_of(m)
    assert set(before) <= set(after)  # every base tensor is the one loaded: none copied
    adapter = sum(t.untyped_storage().nbytes() for t in (*bank.parameters(), *bank.buffers()))
    assert sum(after.values()) - sum(before.values()) == adapter
    ref = reference(s)
    assert same(bank.state_dict(), tying.bank_of(ref).state_dict())
    assert torch.allclose(m(IDS).logits, ref(IDS).logits, atol=1e-6)


PEAK = textwrap.dedent("""
    import json, re, sys, torch, transformers, tying
    torch.set_num_threads(1)
    def hwm():  # the peak resident set (kB) since the last reset
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    cfg = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=1408, vocab_size=8000, tie_word_embeddings=False)
    def build():
        with torch.device("meta"):
            m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        return m
    spec = tying.load_spec("tl6", rank=8, train_modules=["lm_head"])
    tying.apply_(build(), spec)  # every import and first-call cost paid outside the measurement
    m = build()
    base = sum(p.numel() * p.element_size() for p in m.parameters())
    open("/proc/self/clear_refs", "w").write("5")
    start = hwm()
    tying.apply_(m, spec)
    peak = hwm()
    adapter = sum(p.numel() * p.element_size() for p in tying.bank_of(m).parameters())
    print(json.dumps({"base": base, "adapter": adapter, "start": start, "peak": peak}))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_peak_memory_of_apply_is_within_base_plus_adapter(tmp_path):
    """In a process of its own: the peak resident memory while apply_ runs, over what the process held before it
    (the base), stays within the adapter plus a small allowance (allocator slack, far below one base copy)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["start"]
    assert r["base"] > 50 * 2**20 and r["adapter"] > 4 * 2**20  # lm_head copied whole: a real adapter
    assert growth <= r["adapter"] + 8 * 2**20, r  # a copy of the base would add 50 MB and more
