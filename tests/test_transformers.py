"""tying.integrations.transformers: target sets per family, training, generate(), Trainer, checkpointing."""

import pytest
import torch
from conftest import lm_steps, tiny_gpt2, tiny_llama
from tying.integrations import transformers as tx

import tying

transformers = pytest.importorskip("transformers")


def tiny(family):
    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama()
    if family == "gpt2":
        return tiny_gpt2()
    if family == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    if family == "neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=100))
    if family == "bert":
        return transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=100))
    if family == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
            patch_size=8, num_labels=3))


# (layers, d, q/k/v outputs, ffn, fused qkv, fused gate_up)
SHAPES = {"llama": (3, 32, (32, 16, 16), 64, False, False), "gpt2": (3, 32, (96,), 128, True, False),
          "phi3": (2, 32, (64,), 48, True, True), "neox": (2, 32, (96,), 48, True, False),
          "bert": (2, 32, (32, 32, 32), 48, False, False), "vit": (2, 32, (32, 32, 32), 48, False, False)}


@pytest.mark.parametrize("fam", sorted(SHAPES))
def test_lora_counts_per_target_set(fam):
    """Plain LoRA: one A per input group and layer (shared by q/k/v, by gate/up), one B per module."""
    model, r = tiny(fam), 4
    L, d, qkv_out, ffn, _, fused_gate_up = SHAPES[fam]
    mlp_in = 2 * ffn if fused_gate_up else ffn  # phi3's gate_up_proj outputs 2 x ffn
    up_outs = (mlp_in,) if fam != "llama" else (ffn, ffn)
    expected = {
        "attn_qkv": L * (r * d + r * sum(qkv_out)),
        "attn": L * (r * d + r * sum(qkv_out) + r * d + d * r),
        "mlp": L * (r * d + r * sum(up_outs) + r * ffn + d * r),
    }
    expected["all_linear"] = expected["attn"] + expected["mlp"]
    for name, n in expected.items():
        assert tying.count(model, tx.spec(model, "lora", name, rank=r)).trainable == n, name


@pytest.mark.parametrize("fam", sorted(SHAPES))
def test_tl6_all_linear_applies_and_merges(fam):
    model = tiny(fam).eval()
    x = torch.randn(2, 3, 16, 16) if fam == "vit" else torch.randint(1, 100, (2, 6))
    tying.apply_(model, tx.spec(model, "tl6", "all_linear", rank=4))
    with torch.no_grad():
        for p in model.tying_bank.parameters():
            p.normal_(0, 0.2)
        out = lambda: model(x)[0]
        a = out()
        tying.merge_(model)
        assert (out() - a).abs().max() < 1e-5


def test_family_detection_and_errors():
    assert tx.family(tiny_llama()) == "llama" and tx.family(tiny_gpt2()) == "gpt2"
    with pytest.raises(tying.errors.SelectorError, match="unknown target set 'everything'"):
        tx.targets(tiny_llama(), "everything")
    with pytest.raises(tying.errors.SelectorError, match="no known attention naming"):
        tx.family(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _train(model, steps=25, lr=1e-2):
    torch.manual_seed(0)
    data = torch.randint(1, 20, (4, 12))  # a small vocabulary: learnable in a few steps
    return lm_steps(model, data, steps, lr)


@pytest.mark.parametrize("preset", ["lora", "tl6", "vera"])
def test_training_reduces_loss(preset):
    model = tiny_llama().train()
    tying.apply_(model, tx.spec(model, preset, "all_linear", rank=4))
    losses = _train(model, lr=3e-2)
    assert losses[-1] < losses[0] - 0.15, losses  # from ln(100) = 4.6 towards the ~3.0 of 19 used tokens


def test_generate_with_adapted_model():
    model = tiny_gpt2()
    tying.apply_(model, "tl6")
    with torch.no_grad():
        for p in model.tying_bank.parameters():
            p.normal_(0, 0.5)
    prompt = torch.tensor([[5, 6, 7]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    unmerged = model.generate(prompt, **kw)
    tying.merge_(model)
    merged = model.generate(prompt, **kw)
    assert unmerged.shape == (1, 9) and torch.equal(unmerged, merged)


def test_gradient_checkpointing():
    model = tiny_llama().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tying.apply_(model, tx.spec(model, "tl6", "attn", rank=4))
    with torch.no_grad():
        for p in model.tying_bank["v"].values():
            p.normal_(0, 0.5)
    data = torch.randint(1, 100, (2, 8))
    model(input_ids=data, labels=data).loss.backward()
    grads = [p.grad for p in model.tying_bank.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trainer_trains_the_adapter(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset

    class Toy(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.arange(i % 5 + 1, i % 5 + 11)
            return {"input_ids": ids, "labels": ids}

    model = tiny_llama().train()
    tying.apply_(model, "tl6")
    before = {k: v.clone() for k, v in tying.bank_of(model).state_dict().items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Toy()).train()
    after = tying.bank_of(model).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    trained = [k for k, p in tying.bank_of(model).named_parameters() if p.requires_grad]
    assert sorted(changed) == sorted(trained)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_answer_loss_equals_the_models_loss(model_fn):
    """finetune's loss computes logits only at answer tokens; value and gradients match model(**batch).loss."""
    from tying.integrations.llm.finetune import answer_loss
    from tying.integrations.llm.tasks import collate

    model = model_fn()
    tying.apply_(model, tx.spec(model, "tl6", rank=4))
    with torch.no_grad():
        for p in model.tying_bank.parameters():
            p.normal_(0, 0.3)
    enc = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
           {"input_ids": [3, 4, 11], "labels": [-100, 4, 11]}]
    batch = collate(enc, pad_id=0)
    grads = []
    for loss_fn in (lambda: model(**batch).loss, lambda: answer_loss(model, batch)):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.tying_bank.parameters() if p.requires_grad]))
    (ref, g_ref), (got, g_got) = grads
    assert torch.allclose(ref, got, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ref, g_got))
