"""Many PEFT LoRAs into one tied adapter (issue 38): exact at a shared rank of the summed ranks, reported errors below
it, refusals that write nothing, and the result working everywhere a multi-task adapter does."""

import json

import pytest
import torch
from conftest import tiny_llama

import tying
from tying.cli import main
from tying.errors import AdapterFileError

peft = pytest.importorskip("peft")
from tying.integrations.compress import compress_peft
from tying.integrations.peft import export_peft

TARGETS = ["q_proj", "v_proj"]


def lora(tmp_path, name, seed, r=4, alpha=8, targets=TARGETS, layers=3):
    """A PEFT LoRA of the tiny Llama with random (trained-looking) factors; its folder and the model."""
    model = peft.get_peft_model(tiny_llama(layers=layers), peft.LoraConfig(r=r, lora_alpha=alpha,
                                                                          target_modules=targets))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


@pytest.fixture
def three(tmp_path):
    return {n: lora(tmp_path, n, seed, r=r) for n, seed, r in (("nli", 1, 4), ("qa", 2, 2), ("mt", 3, 4))}


def test_exact_at_the_summed_rank_each_task_is_its_lora(tmp_path, three, tokens):
    report = compress_peft({n: f for n, (f, _) in three.items()}, tmp_path / "c", rank=10)
    assert report["exact_at"] == 10 and all(t["relative_error"] < 1e-5 for t in report["tasks"].values())
    for name, (_, model) in three.items():
        alone = tiny_llama()
        tying.load_adapter(alone, tmp_path / "c", task=name)
        with torch.no_grad():
            assert torch.allclose(alone(tokens).logits, model(input_ids=tokens).logits, atol=1e-4), name
    assert json.loads((tmp_path / "c" / "compression.json").read_text())["rank"] == 10


def test_below_it_the_errors_are_reported_and_fall_with_the_rank(tmp_path, three):
    errors = []
    for r in (2, 5, 8):
        report = compress_peft({n: f for n, (f, _) in three.items()}, tmp_path / f"c{r}", rank=r)
        errors.append(max(t["relative_error"] for t in report["tasks"].values()))
        assert set(report["tasks"]["nli"]["modules"]) == {f"model.layers.{i}.self_attn.{p}" for i in range(3)
                                                          for p in TARGETS}
    assert errors[0] > errors[1] > errors[2] > 0
    diag = compress_peft({n: f for n, (f, _) in three.items()}, tmp_path / "d", rank=8, core="diag")
    assert max(t["relative_error"] for t in diag["tasks"].values()) >= errors[2]  # a diagonal core is coarser


def test_every_task_serves_in_one_batch_and_exports_back_to_its_lora(tmp_path, three, tokens):
    compress_peft({n: f for n, (f, _) in three.items()}, tmp_path / "c", rank=10, share="layers")  # 10 < 3 layers x
    model = tiny_llama()  # 10 ranks: share="layers" is not exact; serving and export still compute the adapter
    tying.load_adapters_(model, {"all": tmp_path / "c"})
    names = ["all/nli", "all/qa", "all/mt"]
    ids = torch.cat([tokens, tokens[:1]])
    with torch.no_grad(), tying.adapters(model, names):
        out = model(ids).logits
    for i, name in enumerate(names):
        alone = tiny_llama()
        tying.load_adapter(alone, tmp_path / "c", task=name.split("/")[1])
        with torch.no_grad():
            assert torch.allclose(out[i], alone(ids[i:i + 1]).logits[0], atol=1e-5)
        export_peft(alone, tmp_path / f"peft-{i}")
        served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / f"peft-{i}")
        with torch.no_grad():
            assert torch.allclose(served(input_ids=ids[i:i + 1]).logits, alone(ids[i:i + 1]).logits, atol=1e-4)


def test_other_bases_modules_shapes_and_methods_are_refused_and_nothing_is_written(tmp_path, three):
    good = {n: f for n, (f, _) in three.items()}
    other_targets, _ = lora(tmp_path, "k", 5, targets=["q_proj", "k_proj"])
    cfg = json.loads((three["qa"][0] / "adapter_config.json").read_text())
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    (other_base / "adapter_model.safetensors").write_bytes((three["qa"][0] / "adapter_model.safetensors").read_bytes())
    (other_base / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "gpt2"}))
    (tmp_path / "nli" / "adapter_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "nli" / "adapter_config.json").read_text()), "base_model_name_or_path": "llama"}))
    vera = tmp_path / "vera"
    peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=4, target_modules=TARGETS)).save_pretrained(vera)
    for bad, words in (({**good, "k": other_targets}, "'k' adapts other modules"),
                       ({**good, "o": other_base}, "'o' is of base 'gpt2'"),
                       ({**good, "v": vera}, "'v'.*only plain PEFT LoRA"),
                       ({"a b": good["qa"], "c": good["mt"]}, "task name 'a b'"),
                       ({"only": good["qa"]}, "at least two")):
        with pytest.raises(AdapterFileError, match=words):
            compress_peft(bad, tmp_path / "out", rank=4)
        assert not (tmp_path / "out").exists()


def test_the_command_line(tmp_path, three, capsys):
    args = [f"{n}={f}" for n, (f, _) in three.items()]
    assert main(["compress-peft", *args, "--rank", "10", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "3-task tied adapter (rank 10; exact from rank 10)" in out and "nli" in out
    assert main(["compress-peft", "nonsense", "--rank", "4", "--out", str(tmp_path / "x")]) == 2
    assert "NAME=FOLDER" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [{"target_modules": [*TARGETS, "embed_tokens"]}, {"lora_bias": True},
                                   {"modules_to_save": ["lm_head"]}])
def test_a_lora_with_more_than_linear_lora_factors_is_refused_not_compressed_without_it(tmp_path, three, extra):
    """A folder whose file holds tensors beyond lora_A / lora_B weights of Linear modules (an embedding's LoRA, LoRA
    biases, modules_to_save) was compressed without them: a task's adapter silently lost part of its update."""
    model = peft.get_peft_model(tiny_llama(layers=3), peft.LoraConfig(r=4, lora_alpha=8, **{"target_modules": TARGETS,
                                                                                            **extra}))
    model.save_pretrained(tmp_path / "more")
    with pytest.raises(AdapterFileError, match="'more'.*(lora_embedding|lora_B.bias|lm_head)"):
        compress_peft({"nli": three["nli"][0], "more": tmp_path / "more"}, tmp_path / "out", rank=4)
    assert not (tmp_path / "out").exists()


def test_shared_across_layers_the_report_says_the_rank_that_is_exact(tmp_path, tokens):
    """With share="layers" one pair of bases serves a projection in every layer, so exactness needs the ranks summed
    over the tasks and the layers; the report (and the command line) said the tasks' sum, 4, where 12 is exact."""
    two = {n: lora(tmp_path, n, seed, r=2) for n, seed in (("a", 1), ("b", 2))}
    folders = {n: f for n, (f, _) in two.items()}
    assert compress_peft(folders, tmp_path / "c4", rank=4, share="layers")["exact_at"] == 12  # 3 layers x (2 + 2)
    report = compress_peft(folders, tmp_path / "c12", rank=12, share="layers")
    assert all(t["relative_error"] < 1e-5 for t in report["tasks"].values())
    for name, (_, model) in two.items():
        alone = tiny_llama()
        tying.load_adapter(alone, tmp_path / "c12", task=name)
        with torch.no_grad():
            assert torch.allclose(alone(tokens).logits, model(input_ids=tokens).logits, atol=1e-4)
