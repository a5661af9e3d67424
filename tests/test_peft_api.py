"""A PEFT user's habits with TyingConfig (issue 34): several adapters through PEFT's own API, loading in a process
that never imports tying, modules trained whole kept and disabled exactly, refused loads that change nothing, merge
on the PEFT releases the range admits, PEFT's status functions."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_bank, same_state, snapshot, tiny_llama

import tying

peft = pytest.importorskip("peft")
from tying.integrations import peft as tp

if tp._peft_version() < tp.MIN_PEFT:
    pytest.skip("TyingConfig needs peft >= 0.21", allow_module_level=True)
TyingConfig = tp.TyingConfig
HERE = Path(__file__).parent


def _config(**kw):
    return TyingConfig(**{"spec": "tl6", "rank": 4, "task_type": "CAUSAL_LM", **kw})


def _two_adapters():
    model = peft.get_peft_model(tiny_llama(), _config(), adapter_name="a")
    model.add_adapter("b", _config(spec="lora", rank=2))
    randomize_bank(tying.bank_of(model.get_base_model(), "a"), seed=1)
    randomize_bank(tying.bank_of(model.get_base_model(), "b"), seed=2)
    return model


def _alone(name, seed, **kw):
    """The adapter ``name`` of _two_adapters on a model of its own."""
    model = peft.get_peft_model(tiny_llama(), _config(**kw), adapter_name=name)
    randomize_bank(model.get_base_model(), seed=seed)
    return model


def _head_trained():
    """TL6 that also trains lm_head whole (the spec's train_modules; PEFT's modules_to_save says the same)."""
    spec = tying.load_spec("tl6", rank=4, train_modules=["lm_head"]).model_dump(mode="json")
    model = peft.get_peft_model(tiny_llama(), _config(spec=spec))
    randomize_bank(model.get_base_model())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # train: the factors and the head move
        model(input_ids=torch.randint(0, 100, (2, 7))).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def test_several_adapters_through_peft_s_api(tmp_path, tokens):
    model = _two_adapters()
    names = [n for n, _ in model.named_parameters()]
    assert any(".a." in n for n in names) and any(".b." in n for n in names)  # names carry the adapter's, as PEFT's
    ids = torch.cat([tokens, tokens[:1]])
    with torch.no_grad():
        a = _alone("a", 1)(input_ids=ids).logits
        b = _alone("b", 2, spec="lora", rank=2)(input_ids=ids).logits
        base = tiny_llama()(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, a, atol=1e-5)  # "a" is active, "b" added inactive
        model.set_adapter("b")
        assert torch.allclose(model(input_ids=ids).logits, b, atol=1e-5)
        mixed = model(input_ids=ids, adapter_names=["a", "b", "__base__"]).logits  # rows mixed in one batch
    for i, ref in enumerate((a, b, base)):
        assert torch.allclose(mixed[i], ref[i], atol=1e-5)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".b.A." in n)  # the active one trains
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".a." in n)
    model.save_pretrained(tmp_path)  # every adapter but "default" in a folder of its name, as PEFT does
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    again.load_adapter(str(tmp_path / "b"), adapter_name="b")
    with torch.no_grad():
        out = again(input_ids=ids, adapter_names=["b", "a", "b"]).logits
    assert torch.allclose(out[0], b[0], atol=1e-5) and torch.allclose(out[1], a[1], atol=1e-5)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["a"] and model.active_adapters == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, a, atol=1e-5)


def test_mixed_rows_train_each_adapter_on_its_own_rows(tokens):
    model = _two_adapters()
    model.set_adapter("a")
    model(input_ids=tokens, adapter_names=["a", "b"]).logits.square().mean().backward()
    alone = _alone("a", 1)
    alone(input_ids=tokens[:1]).logits.square().mean().backward()  # row 0 alone; the mean over rows halves it
    grads = {n.rpartition(".a.")[2]: p.grad for n, p in model.named_parameters() if ".a." in n and p.requires_grad}
    for n, p in alone.named_parameters():
        if p.requires_grad:
            key = n.rpartition(".a.")[2]
            assert torch.allclose(grads[key] * 2, p.grad, atol=1e-6), key


def test_peft_type_status_and_base_state_dict(tokens):
    model = _two_adapters()
    cfg = model.peft_config["a"]
    assert cfg.peft_type.value == "TYING" and str(cfg.peft_type) == "PeftType.TYING"
    status = model.get_model_status()
    assert status.peft_types == {"a": "TYING", "b": "TYING"} and status.active_adapters == ["a"]
    assert status.available_adapters == ["a", "b"] and status.enabled is True and status.merged_adapters == []
    assert status.requires_grad == {"a": True, "b": False}
    layers = model.get_layer_status()
    assert {layer.name.rpartition(".")[2] for layer in layers} >= {"q_proj", "k_proj", "v_proj"}
    base = peft.get_base_model_state_dict(model)
    assert set(base) == set(tiny_llama().state_dict())  # the factors are not counted as base weights


def test_merge_on_this_peft_and_safe_merge_refuses_non_finite(tokens):
    model = _alone("default", 1)
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
        model.merge_adapter()  # PEFT 0.22 refused it: the config posed as an adaption prompt
        assert torch.allclose(model(input_ids=tokens).logits, ref, atol=1e-5)
        model.unmerge_adapter()
        tying.bank_of(model.get_base_model())["v"]["model:layers:0:self_attn:q_proj"][0] = float("inf")
    before = snapshot(model.get_base_model())
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert same_state(model.get_base_model(), before) and tying.bank_of(model.get_base_model()).state.merged is False


def test_merge_and_unload_leaves_a_plain_model(tokens):
    model = _alone("default", 1)
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM" and not hasattr(plain, "peft_config")
    assert not any(n.startswith("tying_") for n in plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=tokens).logits, ref, atol=1e-5)


def test_disable_adapter_is_exactly_the_base_with_modules_trained_whole(tokens):
    base = tiny_llama()
    model = _head_trained()
    inner = model.get_base_model()
    with torch.no_grad():
        ref = base(input_ids=tokens).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=tokens).logits, ref)  # before: the trained head stayed (off by 3.2)
        with tying.adapters_disabled(inner):
            assert torch.equal(inner(input_ids=tokens).logits, ref)
        assert not torch.allclose(model(input_ids=tokens).logits, ref, atol=1e-3)


def test_save_pretrained_keeps_modules_trained_whole(tmp_path, tokens):
    model = _head_trained()
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=tokens).logits, ref, atol=1e-5)  # before: the base's head came back


def test_a_refused_load_changes_nothing_and_a_retry_works(tmp_path, tokens):
    _alone("default", 1).save_pretrained(tmp_path / "good")
    bad = _alone("default", 1)
    with torch.no_grad():
        tying.bank_of(bad.get_base_model())["A"]["model:layers:*:self_attn:*"][0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nan")
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(tying.errors.AdapterFileError, match="NaN"):
        peft.PeftModel.from_pretrained(base, tmp_path / "nan")
    assert same_state(base, before) and not tying.engine.banks(base) and not hasattr(base, "peft_config")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "good")  # before: "carries a tying adapter already"
    with pytest.raises(tying.errors.AdapterFileError, match="NaN"):
        model.load_adapter(tmp_path / "nan", adapter_name="other")
    assert list(model.peft_config) == ["default"] and list(tying.engine.banks(base)) == ["default"]


LOAD_WITHOUT_TYING = """
import sys
assert "tying" not in sys.modules  # this process never imports tying itself
import torch, peft, transformers
folder, base_dir = {folder!r}, {base!r}
ids = torch.load({tokens!r})
outs = []
model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), folder)
outs.append(model(input_ids=ids).logits)
outs.append(peft.AutoPeftModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits)
plain = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
plain.load_adapter(folder)
outs.append(plain(input_ids=ids).logits)
outs.append(transformers.AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits)
torch.save(torch.stack(outs), {out!r})
"""


def test_a_process_that_never_imports_tying_loads_the_folder(tmp_path, tokens):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, _config())
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    randomize_bank(model.get_base_model())
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path / "ad")
    torch.save(tokens, tmp_path / "tokens.pt")
    code = LOAD_WITHOUT_TYING.format(folder=str(tmp_path / "ad"), base=str(tmp_path / "base"),
                                     tokens=str(tmp_path / "tokens.pt"), out=str(tmp_path / "out.pt"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for i, got in enumerate(torch.load(tmp_path / "out.pt")):
        assert torch.allclose(got, ref, atol=1e-5), i


def test_the_bridge_is_installed_and_costs_little():
    """The .pth that teaches PEFT the method lies in site-packages and imports only a stdlib module."""
    import importlib.util
    import site

    pth = [Path(d) / "tying-bridges.pth" for d in site.getsitepackages() if (Path(d) / "tying-bridges.pth").is_file()]
    assert pth, "tying-bridges.pth is not installed (pip install -e . puts it there)"
    assert pth[0].read_text().strip() == "import _tying_bridges; _tying_bridges.autoload()"
    code = "import sys; print(sorted(m for m in sys.modules if m.startswith(('tying', 'peft', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"  # a process that never imports PEFT imports nothing of tying or torch
    assert importlib.util.find_spec("_tying_bridges") is not None
