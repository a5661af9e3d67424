"""PEFT interop, checked with PEFT itself: export any tied adapter, import a PEFT LoRA adapter."""

import json

import pytest
import torch
import tying.integrations.transformers
from conftest import randomize_bank, tiny_gpt2, tiny_llama
from tying.integrations import peft as tp
from tying.integrations.peft import export_peft, import_peft

import tying
from tying.cli import main

peft = pytest.importorskip("peft")
FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


LORA_FORM = [p for p in tying.preset_names() if p not in tying.presets.families.FAMILIES
             and tying.load_spec(p).adapter.kind == "lora"]  # the pool family's exports: tests/test_pools.py


@pytest.mark.parametrize("preset", LORA_FORM)
@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_export_loads_in_peft_with_same_outputs(tmp_path, fam, preset, tokens):
    model = FAMILIES[fam](layers=4)  # lora-group4 ties in groups of 4 layers
    tying.apply_(model, tying.load_spec(preset, rank=4, alpha=8))  # scale 2 must be absorbed too
    randomize_bank(model)
    with torch.no_grad():
        ref = model(tokens).logits
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["fan_in_fan_out"] == (fam == "gpt2")  # rank 4 padded to one vLLM serves
    served = peft.PeftModel.from_pretrained(FAMILIES[fam](layers=4), tmp_path).eval()
    with torch.no_grad():
        out = served(tokens).logits
        plain = FAMILIES[fam](layers=4)(tokens).logits
    assert (out - ref).abs().max() < 1e-4 and (plain - ref).abs().max() > 1e-3  # the adapter does change outputs


class ConvEmbedNet(torch.nn.Module):
    """Conv2d (strided, padded), Embedding (padding_idx), a transformers Conv1D and a Linear: every site kind."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8, padding_idx=0)
        self.conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fused = Conv1D(24, 8)  # GPT-2 layout: weight (d_in, d_out)
        self.proj = torch.nn.Linear(24, 8)

    def forward(self, ids):
        h = self.emb(ids)  # (b, 16, 8)
        img = h.transpose(1, 2).reshape(-1, 8, 4, 4)
        h = self.conv(img).flatten(2).mean(-1)  # (b, 8)
        return self.proj(self.fused(h))


@pytest.mark.parametrize("factors", ["AB", "ABuv", "ABuG"])
def test_export_conv_embedding_and_mixed_conv1d_linear(tmp_path, factors):
    net = ConvEmbedNet()
    ids = torch.randint(0, 20, (3, 16), generator=torch.Generator().manual_seed(0))
    spec = tying.load_spec({"targets": [{"select": "re:emb|conv|fused|proj"}],  # sites differ in shape: per site
                            "adapter": {"rank": 2, "alpha": 4, "factors": {f: {"init": "ones"} for f in factors}}})
    tying.apply_(net, spec)
    randomize_bank(net)
    with torch.no_grad():
        ref = net(ids)
    export_peft(net, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["conv", "emb", "fused", "proj"]
    served = peft.PeftModel.from_pretrained(ConvEmbedNet(), tmp_path).eval()
    with torch.no_grad():
        assert (served(ids) - ref).abs().max() < 1e-4 and (ConvEmbedNet()(ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["ia3", "bottleneck", "prefix"])
def test_export_refuses_kinds_without_a_lora_form(tmp_path, preset):
    model = tiny_llama()
    tying.apply_(model, tying.integrations.transformers.spec(model, preset, rank=2))
    with pytest.raises(tying.errors.AdapterFileError, match="only adapters of a kind with a PEFT export .* export to PEFT"):
        export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_cli_export_from_adapter_folder_on_a_meta_model(tmp_path, tokens):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    with torch.no_grad():
        ref = model(tokens).logits
    tying.save_adapter(model, tmp_path / "tied")
    cfg = tmp_path / "config.json"
    cfg.write_text(model.config.to_json_string())
    assert main(["export-peft", "--model", str(cfg), "--adapter", str(tmp_path / "tied"), "--out",
                 str(tmp_path / "peft")]) == 0
    served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (served(tokens).logits - ref).abs().max() < 1e-4


def test_cli_exports_one_task_of_a_multi_task_folder(tmp_path, tokens, capsys):
    model = tiny_llama()
    tying.apply_(model, tying.load_spec("tl6", rank=4, tasks=["a", "b"]))
    randomize_bank(model)
    with torch.no_grad(), tying.adapters(model, "b"):
        ref = model(tokens).logits
    tying.save_adapter(model, tmp_path / "tied")
    cfg = tmp_path / "config.json"
    cfg.write_text(model.config.to_json_string())
    args = ["export-peft", "--model", str(cfg), "--adapter", str(tmp_path / "tied"), "--out", str(tmp_path / "peft")]
    assert main(args) == 2 and "a PEFT LoRA holds one task" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()
    assert main([*args, "--task", "b"]) == 0
    served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (served(tokens).logits - ref).abs().max() < 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_adapter(tmp_path, tokens, rslora):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, use_rslora=rslora,
                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval()
    with torch.no_grad():
        ref = pm(tokens).logits
    pm.save_pretrained(tmp_path)
    model = tiny_llama()
    import_peft(model, tmp_path)
    assert tying.bank_of(model).spec.adapter.rank == 4 and len(tying.bank_of(model).plan.sites) == 9
    with torch.no_grad():
        assert (model(tokens).logits - ref).abs().max() < 1e-5


def test_import_refuses_unsupported(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path)
    with pytest.raises(tying.errors.AdapterFileError, match="only plain PEFT LoRA adapters import.*use_dora"):
        import_peft(tiny_llama(), tmp_path)
    with pytest.raises(tying.errors.AdapterFileError, match="is not a PEFT adapter folder"):
        import_peft(tiny_llama(), tmp_path / "nothing")


def vllm_rules(folder) -> list[str]:
    """What vLLM checks of a LoRA adapter folder (vllm/lora/peft_helper.py and vllm/config/lora.py, as documented):
    the required fields, r within a max_lora_rank it accepts, no bias, no modules_to_save, no DoRA, lora_A / lora_B
    tensors under base_model.model.<module>, shapes (r, in) and (out, r)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if cfg.get("r") not in tp.VLLM_RANKS:
        problems.append(f"r {cfg.get('r')} is no max_lora_rank vLLM accepts {tp.VLLM_RANKS}")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save") or cfg.get("use_dora"):
        problems.append("bias, modules_to_save or DoRA")
    from safetensors.torch import load_file
    for k, t in load_file(str(folder / "adapter_model.safetensors")).items():
        if not (k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))):
            problems.append(f"key {k}")
        elif t.shape[0 if k.endswith("lora_A.weight") else 1] != cfg["r"]:
            problems.append(f"{k} has shape {tuple(t.shape)} for r {cfg['r']}")
    return problems


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_contract_export_is_exact_padded_to_a_rank_vllm_serves_and_loads_with_transformers(tmp_path, fam, tokens):
    model = FAMILIES[fam]()
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    randomize_bank(model)
    with torch.no_grad():
        ref = model(tokens).logits
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and vllm_rules(tmp_path) == []
    assert cfg["target_modules"] == (["k_proj", "q_proj", "v_proj"] if fam == "llama" else ["c_attn"])
    plain = FAMILIES[fam]()
    plain.load_adapter(str(tmp_path))  # transformers' own PEFT integration
    with torch.no_grad():
        assert (plain(tokens).logits - ref).abs().max() < 1e-4
    export_peft(model, tmp_path / "exact", pad_rank=False)
    assert json.loads((tmp_path / "exact" / "adapter_config.json").read_text())["r"] == 4


def test_export_names_full_module_paths_where_last_names_would_select_more(tmp_path, tokens):
    model = tiny_llama(layers=4)
    spec = tying.load_spec("tl6", rank=4, targets=[{"select": "model.layers.{layer:0|2}.self_attn.{proj:q_proj|v_proj}"}])
    tying.apply_(model, spec)
    randomize_bank(model)
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in ("q_proj", "v_proj"))
    served = peft.PeftModel.from_pretrained(tiny_llama(layers=4), tmp_path).eval()
    with torch.no_grad():
        assert (served(tokens).logits - model(tokens).logits).abs().max() < 1e-4
