"""integrations.llm tasks / metrics / finetune: metrics on known values, parsers on inline samples, encoding, a tiny run."""

import gzip
import json
import string

import pytest
import torch
from tying.integrations.llm import metrics, tasks

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------- helpers
def char_tokenizer():
    """An offline character-level fast tokenizer with a ChatML template (vocab 104)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    vocab["[UNK]"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                               unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def b64(n: int) -> str:
    """dictd's base64 number encoding."""
    digits = ""
    while True:
        digits = tasks._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


# ---------------------------------------------------------------- metrics
def test_squad_score_known_values():
    preds = ["Denver Broncos", "the cat", "blue house"]
    refs = [["Broncos", "Denver Broncos"], "A cat!", "red house"]
    s = metrics.squad_score(preds, refs)
    assert s["exact_match"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert s["per_example"] == [100.0, 100.0, 0.0]
    assert metrics.normalize_answer("  The  Eiffel-Tower, an icon. ") == "eiffeltower icon"


def test_rouge_known_values():
    pytest.importorskip("rouge_score")
    assert metrics.rouge_score(["the cat sat on the mat"], ["the cat sat on the mat"])["rougeL"] == pytest.approx(100)
    assert metrics.rouge_score(["dogs bark"], ["the cat sat"])["rougeL"] == 0
    # LCS 3 of 3 predicted and 6 reference tokens: P = 1, R = 0.5, F = 2/3
    assert metrics.rouge_score(["the cat sat"], ["the cat sat on the mat"])["rougeL"] == pytest.approx(200 / 3)


def test_nli_accuracy():
    preds = ["Entailment.", "I think it is neutral", "contradiction", "no idea"]
    s = metrics.nli_score(preds, ["entailment", "neutral", "entailment", "neutral"])
    assert s == {"accuracy": 50.0, "n": 4, "per_example": [100.0, 100.0, 0.0, 0.0]}
    assert metrics.nli_label("not entailment but contradiction") == "entailment"


def test_bleu_known_values():
    sacrebleu = pytest.importorskip("sacrebleu")
    refs = ["The rumor spread quickly through the town.", "We had a good time."]
    assert metrics.bleu_score(refs, refs)["bleu"] == pytest.approx(100)
    assert metrics.bleu_score(["xyz uvw", "qqq rrr"], refs)["bleu"] == pytest.approx(0)
    preds = ["The rumour spread quickly through the town.", "We had fun."]
    assert metrics.bleu_score(preds, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)


def test_gsm_final_number_and_score():
    assert metrics.final_number("2 + 3 = 5\n#### 1,234") == 1234
    assert metrics.final_number("So she has 7 apples, i.e. 42.5 in total.") == 42.5
    assert metrics.final_number("no digits") is None
    preds = ["... so the answer is 42.", "#### 7", "The total is 8"]
    assert metrics.gsm_score(preds, ["#### 42", "6 + 1 = 7\n#### 7", "9"])["exact_match"] == pytest.approx(200 / 3)


def test_metric_length_mismatch():
    with pytest.raises(ValueError):
        metrics.squad_score(["a"], [])


# ---------------------------------------------------------------- parsers on inline samples
def test_parse_squad_filters_long_paragraphs():
    raw = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "Denver won the game.", "qas": [{"id": "1", "question": "Who won? ", "answers": [
            {"answer_start": 0, "text": "Denver"}, {"answer_start": 0, "text": "Denver Broncos"}]}]},
        {"context": "word " * 300, "qas": [{"id": "2", "question": "?", "answers": [{"answer_start": 0,
                                                                                  "text": "word"}]}]}]}]}
    out = tasks.parse_squad(raw, max_words=110)
    assert len(out) == 1
    assert out[0]["answer"] == "Denver" and out[0]["references"] == ["Denver", "Denver Broncos"]
    assert "Passage: Denver won the game." in out[0]["prompt"] and out[0]["prompt"].endswith("Question: Who won?")


def test_parse_xsum_truncates_articles():
    raw = {"canary": "x", "examples": [{"input": "a b c d e", "target": " Short. ", "comment": "xsum-test-0"}]}
    out = tasks.parse_xsum(raw, max_words=3)
    assert out == [{"prompt": "Summarize the article in one sentence.\n\nArticle: a b c ...", "answer": "Short."}]


def test_parse_snli_skips_unlabelled():
    rec = {"annotator_labels": ["neutral"], "gold_label": "neutral", "sentence1": "A man sleeps.",
           "sentence2": "A man is tired.", "pairID": "1"}
    lines = [json.dumps(rec), json.dumps({**rec, "gold_label": "-"}), ""]
    out = tasks.parse_snli(lines)
    assert len(out) == 1 and out[0]["answer"] == "neutral"
    assert out[0]["prompt"].startswith("Premise: A man sleeps.\nHypothesis: A man is tired.\n")


DICT_ENTRIES = [
    "Aal\n {m} [cook.]\n   eel\n",  # a word, not a sentence
    "Er zuckte die Achseln.\n\n   He shrugged his shoulders.\n",
    ("Aus medizinischer Sicht ist Sarah ein einmaliger Fall.\n\n   As far as the medical profession is concerned,"
     " Sarah is one of a\nkind.\n"),  # wrapped English line
    "Er hatte 1,5 Promille.\n [ugs.]\n   He had an alcohol level of 150 millilitres [Br.].\n",
    "Er hat es etw. gesagt.\n\n   He told sb. something.\n",  # placeholders
    "Es ist nicht ohne Abhilfe.\n\n   He / It is not without remedy.\n",  # alternatives
    "Das kann doch wohl nicht dein Ernst sein!\n\n   You must be joking!; You can’t be serious!\n",
]


def test_sentence_pair_heuristic():
    pairs = [tasks.sentence_pair(e) for e in DICT_ENTRIES]
    assert pairs == [
        None,
        ("Er zuckte die Achseln.", "He shrugged his shoulders."),
        ("Aus medizinischer Sicht ist Sarah ein einmaliger Fall.",
         "As far as the medical profession is concerned, Sarah is one of a kind."),
        ("Er hatte 1,5 Promille.", "He had an alcohol level of 150 millilitres."),
        None,
        None,
        ("Das kann doch wohl nicht dein Ernst sein!", "You must be joking!"),
    ]


def test_dict_entries_and_pairs_from_index():
    body, index, offset = b"", [], 0
    for entry in DICT_ENTRIES + [DICT_ENTRIES[1]]:  # the duplicate German sentence is kept once
        data = entry.encode()
        index.append(f"{entry.split(chr(10))[0]}\t{b64(offset)}\t{b64(len(data))}")
        body, offset = body + data, offset + len(data)
    index.append(f"alias of entry 2\t{b64(len(DICT_ENTRIES[0].encode()))}\t{b64(len(DICT_ENTRIES[1].encode()))}")
    assert tasks.dict_entries(gzip.decompress(gzip.compress(body)), "\n".join(index))[:2] == DICT_ENTRIES[:2]
    out = tasks.parse_dict_pairs(body, "\n".join(index))
    assert [e["answer"] for e in out] == ["He shrugged his shoulders.",
                                          "As far as the medical profession is concerned, Sarah is one of a kind.",
                                          "He had an alcohol level of 150 millilitres.", "You must be joking!"]
    assert out[0]["prompt"].endswith("German: Er zuckte die Achseln.")


def test_gsm_example():
    rec = {"question": "Tom has 3 apples and buys 4. How many? ", "answer": "7",
           "metadata": {"answer_cot": "3 + 4 = 7\n#### 7", "answer_value": 7}}
    assert tasks.gsm_example(rec) == {"prompt": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}
    assert tasks.gsm_example({**rec, "metadata": {}})["answer"] == "#### 7"


def test_load_gsm8k_disjoint_splits_with_final_numbers():
    pytest.importorskip("reasoning_gym", reason="the bench extra installs reasoning-gym")
    train, test = tasks.load_gsm8k(n_train=8, n_test=5)
    assert len(train) == 8 and len(test) == 5
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert all(metrics.final_number(e["answer"]) is not None for e in train + test)
    assert tasks.load_gsm8k(n_train=8, n_test=5)[1] == test  # fixed test split


def test_jsonl_task(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    train, test = tasks.load_jsonl(path, n_train=5, n_test=4, seed=1)
    assert len(train) == 5 and len(test) == 4 and not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert tasks.load_jsonl(path, n_test=4, seed=2)[1] == test  # the split does not depend on the seed
    task = tasks.get_task(str(path))
    assert task.score(["a1"], ["a1"])["exact_match"] == 100
    path.write_text('{"prompt": "q"}\n')
    with pytest.raises(ValueError, match="answer"):
        tasks.load_jsonl_examples(path)
    from tying.integrations.llm.hf_data import DataSourceError

    with pytest.raises(DataSourceError, match="unknown task"):
        tasks.get_task("nope")


def test_registry_and_postprocess():
    assert {k for k, t in tasks.TASKS.items() if t.load} == {"squad", "xsum", "nli", "translation", "gsm8k"}
    assert {k for k, t in tasks.TASKS.items() if not t.load} == {"dialogsum", "hellaswag"}  # Hugging Face data only
    assert tasks.clean_answer('\nEnglish: "It is dark."\n\nExplanation: ...') == "It is dark."
    assert tasks.TASKS["squad"].references([{"answer": "a", "references": ["a", "b"]}, {"answer": "c"}]) == [
        ["a", "b"], "c"]


# ---------------------------------------------------------------- encoding
def test_encode_example_masks_prompt():
    tok = char_tokenizer()
    enc = tasks.encode_example(tok, "hi", "yo", max_len=256)
    prompt = tok(tasks.render_prompt(tok, "hi"), add_special_tokens=False)["input_ids"]
    assert enc["labels"][:len(prompt)] == [-100] * len(prompt)
    assert enc["input_ids"][:len(prompt)] == prompt
    assert enc["labels"][len(prompt):] == enc["input_ids"][len(prompt):] == tok("yo<|im_end|>")["input_ids"]


def test_encode_example_truncation_keeps_answer():
    tok = char_tokenizer()
    enc = tasks.encode_example(tok, "instruction " + "x" * 200 + " question?", "the answer", max_len=64)
    answer = tok("the answer<|im_end|>")["input_ids"]
    assert len(enc["input_ids"]) == 64 and enc["input_ids"][-len(answer):] == answer
    assert enc["labels"][-len(answer):] == answer and enc["labels"][:64 - len(answer)] == [-100] * (64 - len(answer))
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>user\ninstr") and "question?<|im_end|>" in text
    long = tasks.encode_example(tok, "p" * 100, "a" * 100, max_len=64)  # a long answer keeps half the room
    assert len(long["input_ids"]) == 64 and sum(x != -100 for x in long["labels"]) == 32


def test_collate_pads_right():
    batch = tasks.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                          pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- finetune + generate on a tiny model
def test_finetune_and_generate_tiny(tmp_path, one_thread):
    from tying.integrations.llm.finetune import finetune, generate_answers

    torch.manual_seed(0)
    tok = char_tokenizer()
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=128, pad_token_id=0, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        p.requires_grad = "q_proj" in name or "lm_head" in name or "embed" in name
    saved = []
    hist = finetune(model, [{"prompt": "2+2", "answer": "4"}], tok, steps=30, lr=3e-2, batch_size=2, seed=0,
                    eval_fn=lambda m: {"ok": 1}, eval_every=10, out_dir=tmp_path,
                    save_fn=lambda m, d: saved.append(d), progress=False)
    assert len(hist["loss"]) == 30 and hist["loss"][-1] < hist["loss"][0] / 2
    assert [e["step"] for e in hist["eval"]] == [10, 20, 30] and saved == [tmp_path]
    assert json.loads((tmp_path / "history.json").read_text())["loss"] == hist["loss"]
    assert hist["lr"][0] == pytest.approx(3e-2) and hist["lr"][-1] < 3e-3  # linear decay
    out = generate_answers(model, tok, ["2+2", "a longer prompt"], max_new_tokens=3, batch_size=2, threads=2)
    assert len(out) == 2 and all(isinstance(o, str) for o in out) and tok.padding_side == "right"
    assert torch.get_num_threads() == 1  # restored
    assert out[0] == "4"
    with pytest.raises(ValueError, match="trainable"):
        finetune(model.requires_grad_(False), [{"prompt": "a", "answer": "b"}], tok, steps=1, progress=False)


# ---------------------------------------------------------------- real assets (downloads; deselected by default)
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_real_loaders(name):
    train, test = tasks.TASKS[name].load(n_train=20, n_test=10, seed=0)
    assert len(train) == 20 and len(test) == 10
    assert all(isinstance(e["prompt"], str) and isinstance(e["answer"], str) for e in train + test)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}


@pytest.mark.slow
def test_real_smollm2_encoding():
    from tying.integrations.llm.models import load_smollm2

    model, tok = load_smollm2()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    enc = tasks.encode_example(tok, "Translate from German to English.\n\nGerman: Es wird finster.", "It's dark.", 256)
    answer = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert tok.decode(answer) == "It's dark.<|im_end|>"
