"""integrations.llm.models: one loader for folders, GGUF files, hub ids and the built-in; device and dtype checks."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_tasks import char_tokenizer
from tying.integrations import transformers as tx
from tying.integrations.llm import models

import tying


def tiny_llm_folder(path, layers: int = 2):
    """A save_pretrained folder (model and tokenizer) of a small random Llama with a chat template."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=len(tok),
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def addition_jsonl(path, n: int = 30):
    """A JSONL file of {"prompt", "answer"} lines."""
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(n)))
    return path


def test_load_folder_in_bfloat16_without_touching_the_environment(tmp_path):
    folder = tiny_llm_folder(tmp_path / "tiny")
    env = dict(os.environ)
    model, tok = models.load_model(str(folder), dtype="bfloat16", device="cpu")
    assert dict(os.environ) == env  # no HF_HUB_OFFLINE or anything else left behind
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert models.resolve(str(folder)).kind == "folder"


def test_resolve_classifies_and_refuses_bad_names(tmp_path, monkeypatch):
    assert models.resolve("smollm2-135m").kind == "builtin"
    with pytest.raises(models.ModelSourceError, match="no such model folder"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(models.ModelSourceError, match="not a built-in name"):
        models.resolve("no-such-model")  # neither built-in, path nor owner/name
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelSourceError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(models.ModelSourceError, match="no such GGUF"):
        models.resolve(str(tmp_path / "m.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert models.resolve(str(tmp_path / "m.gguf")).kind == "gguf"
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(models.ModelSourceError, match="needs the 'gguf' package"):
        models.resolve(str(tmp_path / "m.gguf"))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(models.ModelSourceError, match="hub id could not be loaded"):
        models.resolve("tying-tests/no-such-model", local_files_only=True)


def test_check_device_refuses_what_this_machine_cannot_run(monkeypatch):
    models.check_device("cpu", torch.float32)
    with pytest.raises(models.PrecisionError, match="not a device; use cpu, cuda"):
        models.check_device("gpu0", torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(models.PrecisionError, match="CUDA is not available"):
            models.check_device("cuda", torch.bfloat16)

    def no_half(self, x):  # what a CPU without float16 kernels raises
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return torch.nn.functional.linear(x, self.weight, self.bias)

    monkeypatch.setattr(torch.nn.Linear, "forward", no_half)
    with pytest.raises(models.PrecisionError, match="model.dtype float16 on model.device cpu.*use float32 or bfloat16"):
        models.check_device("cpu", torch.float16)


def test_bfloat16_base_with_float32_factors_trains_in_float32(tmp_path):
    model, _ = models.load_model(str(tiny_llm_folder(tmp_path / "tiny")), dtype=torch.bfloat16)
    tying.apply_(model, tx.spec(model, "tl6", rank=4), dtype=torch.float32)
    factors = list(model.tying_bank.parameters())
    assert {p.dtype for p in factors} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("tying_bank")} == {torch.bfloat16}
    with torch.no_grad():
        for p in factors:
            p.normal_(0, 0.1)
    ids = torch.randint(3, 50, (2, 9))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    trained = [p for p in factors if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
                           for p in trained)


def tiny_gguf(folder, layers: int = 2):
    """A GGUF file of a small random Llama with a character vocabulary, written with the gguf package (as
    llama.cpp's tools write them): float32 tensors under llama.cpp's names, the llama tokenizer's metadata."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    d, heads, kv, ff = 32, 4, 2, 64
    chars = [chr(c) for c in range(32, 127)]
    tokens = ["<unk>", "<s>", "</s>", *chars]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * len(chars))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def tensor(name, shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    tensor("token_embd.weight", (len(tokens), d))
    tensor("output.weight", (len(tokens), d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv * d // heads, d)), ("attn_v", (kv * d // heads, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            tensor(f"blk.{i}.{name}.weight", shape)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_any_gguf_trains_through_the_kit_and_reproduce(tmp_path):
    """A GGUF file other than the built-in one (issue 29): transformers dequantizes it but marks the model
    "quantized with gguf", which its Trainer refused to train; the kit's loader and reproduce.py train it."""
    from test_reproduce import reproduce, tiny_config
    from tying.integrations.llm.finetune import finetune

    gguf = tiny_gguf(tmp_path / "m")
    model, tok = models.load_model(str(gguf), dtype="float32")
    assert not getattr(model, "is_quantized", False)
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    train = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(8)]
    hist = finetune(model, train, tok, steps=3, lr=1e-2, batch_size=2, seed=0)
    assert len(hist["loss"]) == 3 and hist["loss"][-1] != hist["loss"][0]
    jsonl = addition_jsonl(tmp_path / "add.jsonl")
    reproduce.main([str(tiny_config(tmp_path / "c.yaml", gguf, jsonl)), f"out={tmp_path / 'o'}"])
    rows = json.loads((tmp_path / "o" / "reproduce.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["zero-shot", "tl6"] and rows[1]["trainable"] > 0


def test_tying_trainer_takes_a_model_a_user_loaded_with_gguf_file(tmp_path):
    from datasets import Dataset
    from tying.integrations.transformers import TyingTrainer

    gguf = tiny_gguf(tmp_path / "m")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert model.is_quantized  # as transformers leaves it
    tying.apply_(model, tying.load_spec("tl6", rank=4))
    before = {k: v.clone() for k, v in tying.bank_of(model).state_dict().items()}
    data = Dataset.from_dict({"input_ids": [[1, 40, 41, 42, 43, 44]] * 8, "labels": [[1, 40, 41, 42, 43, 44]] * 8})
    args = transformers.TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="no")
    TyingTrainer(model=model, args=args, train_dataset=data).train()
    after = tying.bank_of(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
