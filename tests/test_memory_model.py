"""Issue 36.4: the memory model's components against exact counts on tiny models, `tying count --memory`, bad input."""

import json

import pytest
import torch

import tying
from tying.cli import main
from tying.errors import TyingError

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")
from tying.integrations import memory

activation_bytes, adapter_params, base_bytes = memory.activation_bytes, memory.adapter_params, memory.base_bytes
layer_bytes, logits_bytes, predict_memory = memory.layer_bytes, memory.logits_bytes, memory.predict_memory

CFG = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
       "intermediate_size": 172, "vocab_size": 300}
B, S = 2, 16


def llama(tied: bool = False, dtype=torch.float32, device=None):
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG, tie_word_embeddings=tied))
    for p in model.parameters() if device != "meta" else ():  # the parameters, as from_pretrained(dtype=...) does
        p.data = p.data.to(dtype)
    return model.train()


def stored(model) -> int:
    """The bytes a model holds: parameters, buffers and bitsandbytes' quantization states, each storage once."""
    seen = {}
    for t in (*model.parameters(), *model.buffers()):
        for x in (t, getattr(t, "SCB", None), *(getattr(getattr(t, "quant_state", None), n, None)
                                                for n in ("absmax", "code"))):
            if x is not None:
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_base_bytes_are_the_models_bytes(tied, dtype):
    assert base_bytes(llama(tied, device="meta"), dtype) == stored(llama(tied, dtype))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_bytes_are_the_loaded_models_bytes(tmp_path, quant, one_thread):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from tying.integrations.quant import config

    llama().save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", dtype=torch.bfloat16, device_map="cpu", quantization_config=config(quant, torch.bfloat16))
    assert base_bytes(llama(device="meta"), torch.bfloat16, quant) == stored(loaded)


def test_adapter_params_are_the_adapters_parameters():
    pytest.importorskip("peft")
    import peft

    trainable, frozen, _ = adapter_params(llama(device="meta"), "tl6", 4)
    m = llama()
    tying.apply_(m, tying.load_spec("tl6", rank=4))
    assert (trainable, frozen) == (sum(p.numel() for p in tying.bank_of(m).parameters()), 0)
    trainable, _, sites = adapter_params(llama(device="meta"), "peft-lora", 4)
    p = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert trainable == sum(q.numel() for q in p.parameters() if q.requires_grad) and len(sites) == 9


def saved(model, ids) -> int:
    """Bytes of the storages autograd saves for backward in a forward with loss (model parameters aside)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(n for k, n in seen.items() if k not in own)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("adapter", ["tl6", "peft-lora"])
def test_activations_are_what_autograd_saves(adapter, dtype, one_thread):
    """The derivation, tensor by tensor: the prediction plus the loss's saved log-probabilities is exactly what
    autograd saves (to the 4 bytes of the loss's scalar weight)."""
    ids = torch.randint(0, CFG["vocab_size"], (B, S), generator=torch.Generator().manual_seed(0))
    meta = llama(device="meta")
    _, _, sites = adapter_params(meta, adapter, 4)
    predicted = activation_bytes(meta, sites, adapter == "peft-lora", 4, B, S, dtype)
    m = llama(dtype=dtype)
    if adapter == "tl6":
        tying.apply_(m, tying.load_spec("tl6", rank=4), dtype=torch.float32)
    else:
        peft = pytest.importorskip("peft")
        m = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    log_probs = 4 * B * S * CFG["vocab_size"]  # the loss's saved float32 log-softmax, a third of logits_bytes
    assert logits_bytes(meta, B, S) == 3 * log_probs
    assert 0 <= saved(m, ids) - log_probs - predicted <= 4


def test_checkpointing_processes_and_the_total():
    meta = llama(device="meta")
    full = predict_memory(meta, "tl6", rank=4, batch=B, seq=S)
    gc = predict_memory(meta, "tl6", rank=4, batch=B, seq=S, checkpointing=True)
    assert gc.activations < full.activations and gc.base == full.base
    two = predict_memory(meta, "tl6", rank=4, batch=B, seq=S, processes=2)
    assert two.base == -(-full.base // 2) + 2 * layer_bytes(meta, torch.bfloat16, "none")
    assert two.adapter == -(-full.adapter // 2) and two.activations == full.activations
    assert full.total == sum(v for k, v in full.to_dict().items() if k != "total")
    assert predict_memory(meta, "tl6", rank=4, overhead=123).overhead == 123


def test_count_memory_flag(capsys):
    assert main(["count", "--model", "smollm2-135m", "--spec", "tl6", "--rank", "8", "--memory", "--quant", "nf4",
                 "--seq", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    meta = tying.cli.meta_model("smollm2-135m")
    assert out["memory"]["tying"] == predict_memory(meta, "tl6", rank=8, quant="nf4", seq=64).to_dict()
    assert out["memory"]["peft-lora"] == predict_memory(meta, "peft-lora", rank=8, quant="nf4", seq=64).to_dict()
    assert out["trainable"] == tying.count(meta, "tl6", rank=8).trainable
    assert main(["count", "--model", "smollm2-135m", "--spec", "tl6", "--memory", "--checkpointing",
                 "--processes", "2"]) == 0
    text = capsys.readouterr().out
    assert "peak training memory per process" in text and "peft-lora" in text and "total" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--quant", "nf5"], "unknown quantization 'nf5'; choose one of none, nf4, int8"),
    (["--batch", "0"], "batch=0: give a whole number of at least 1"),
    (["--processes", "-1"], "processes=-1: give a whole number of at least 1"),
    (["--dtype", "int8"], "dtype 'int8': give a floating-point compute dtype"),
    (["--overhead-mb", "-5"], "overhead=-5000000: give a number of bytes"),
])
def test_count_memory_bad_input(argv, message, capsys):
    assert main(["count", "--model", "smollm2-135m", "--spec", "tl6", "--memory", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_models_and_adapters():
    meta = llama(device="meta")
    with pytest.raises(TyingError, match="counts Llama-style decoders .* this model is 'gpt2'"):
        predict_memory(tying.cli.meta_model("gpt2"), "tl6")
    with pytest.raises(TyingError, match="targets \\['nope'\\] match no Linear layer"):
        predict_memory(meta, "peft-lora", rank=4, targets=("nope",))
    with pytest.raises(TyingError, match="rank=None"):
        predict_memory(meta, "peft-lora")
    with pytest.raises(TyingError, match="knows the sites .* also targets \\['lm_head'\\]"):
        activation_bytes(meta, {"model.layers.0.lm_head": "x"}, False, 4, 1, 8, torch.bfloat16)
