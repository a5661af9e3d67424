"""integrations.llm.hf_data: the Hugging Face datasets copies, read through `datasets` from local json/parquet
files written here (no network); prompts, answers and metrics equal those of the packaged sources."""

import json

import pytest

datasets = pytest.importorskip("datasets")
from tying.integrations.llm import hf_data, tasks

SNLI_HF = [{"premise": "A man plays a guitar.", "hypothesis": "A person makes music.", "label": 0},
           {"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "label": 2},
           {"premise": "Kids eat.", "hypothesis": "Kids are hungry.", "label": 1},
           {"premise": "No label here.", "hypothesis": "Skipped.", "label": -1}]
SQUAD_HF = [{"id": "1", "title": "t", "context": "Paris is the capital of France.", "question": " What is the capital? ",
             "answers": {"text": ["Paris", "Paris"], "answer_start": [0, 0]}}]
RECORDS = {  # one record per task in its hub format
    "squad": SQUAD_HF,
    "xsum": [{"document": "word " * 150, "summary": " A summary. ", "id": "x"}],
    "dialogsum": [{"id": "d", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "hi"}],
    "nli": SNLI_HF,
    "hellaswag": [{"ctx": "A woman sits down", "endings": ["and flies.", "and eats.", "and sings.", "and runs."],
                   "label": "1"}],
    "translation": [{"translation": {"de": "Ich bin hier.", "en": "I am here."}}],
    "gsm8k": [{"question": "What is 2+3? ", "answer": "2+3=<<2+3=5>>5\n#### 5"}],
}


def write(folder, split, records, fmt):
    """One split file as datasets.load_dataset(folder) reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(folder / f"{split}.parquet"))
    else:
        (folder / f"{split}.{fmt}").write_text("".join(json.dumps(r) + "\n" for r in records))


def local_copy(root, fmt="jsonl", drop=(), drop_field=None):
    for name, recs in RECORDS.items():
        for split in hf_data.SOURCES[name].splits:
            if split not in drop:
                rows = [{k: v for k, v in r.items() if k != drop_field} for r in recs]
                write(root / name, split, rows, fmt)
    return root


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_every_task_loads_from_a_local_folder(tmp_path, fmt):
    root = local_copy(tmp_path, fmt)
    for name in hf_data.SOURCES:
        train, test = tasks.get_task(name, str(root)).load(n_train=10, n_test=10, seed=3)
        assert train and test, name
        assert all(isinstance(e["prompt"], str) and isinstance(e["answer"], str) for e in train + test)
    train, test = tasks.get_task("nli", str(root)).load(n_train=10, n_test=10)
    assert len(train) == 3 and {e["answer"] for e in train} == {"entailment", "neutral", "contradiction"}  # -1 skipped
    (ex,) = tasks.get_task("hellaswag", str(root)).load(n_train=1, n_test=1)[1]
    assert ex["answer"] == "2" and "2. and eats." in ex["prompt"]
    assert tasks.get_task("gsm8k", str(root)).load(1, 1)[1][0]["answer"].endswith("#### 5")


def test_prompts_answers_and_metrics_match_the_packaged_sources(tmp_path):
    root = local_copy(tmp_path)
    packaged_snli = tasks.parse_snli([json.dumps({"sentence1": r["premise"], "sentence2": r["hypothesis"],
                                                  "gold_label": hf_data._NLI.get(r["label"], "-")}) for r in SNLI_HF])
    hub_snli = [hf_data.SOURCES["nli"].example(r) for r in SNLI_HF]
    assert [e for e in hub_snli if e] == packaged_snli
    packaged_squad = tasks.parse_squad({"data": [{"paragraphs": [{"context": SQUAD_HF[0]["context"], "qas": [
        {"question": SQUAD_HF[0]["question"], "answers": [{"text": "Paris"}, {"text": "Paris"}]}]}]}]})
    assert tasks.get_task("squad", str(root)).load(1, 1)[1] == packaged_squad
    packaged_xsum = tasks.parse_xsum({"examples": [{"input": RECORDS["xsum"][0]["document"], "target": " A summary. "}]})
    assert tasks.get_task("xsum", str(root)).load(1, 1)[1] == packaged_xsum
    for name in ("squad", "xsum", "nli", "translation", "gsm8k"):
        local, packaged = tasks.get_task(name, str(root)), tasks.get_task(name)
        assert (local.score, local.metric, local.postprocess, local.max_new_tokens) == (
            packaged.score, packaged.metric, packaged.postprocess, packaged.max_new_tokens)


def test_missing_folder_split_or_field_is_a_clear_error(tmp_path):
    with pytest.raises(hf_data.DataSourceError, match="no such folder"):
        hf_data.load_splits("nli", str(tmp_path / "nope"))
    with pytest.raises(hf_data.DataSourceError, match="no folder .*nli.* or .*snli"):
        hf_data.load_splits("nli", str(tmp_path))
    local_copy(tmp_path / "a", drop=("test",))
    with pytest.raises(hf_data.DataSourceError, match="no 'test' split.*add a test.json"):
        hf_data.load_splits("nli", str(tmp_path / "a"))
    local_copy(tmp_path / "b", drop_field="hypothesis")
    with pytest.raises(hf_data.DataSourceError, match="lacks the field\\(s\\) hypothesis"):
        hf_data.load_splits("nli", str(tmp_path / "b"))


def test_tasks_without_a_packaged_source_need_data():
    with pytest.raises(hf_data.DataSourceError, match="data: hf"):
        tasks.get_task("dialogsum")
    with pytest.raises(hf_data.DataSourceError, match="unknown task"):
        tasks.get_task("nope", "hf")


def test_choice_score_reads_the_first_number():
    from tying.integrations.llm.metrics import choice_score
    got = choice_score(["2", "The answer is 3.", "none", "12"], ["2", "2", "1", "1"])
    assert got == {"accuracy": 25.0, "n": 4, "per_example": [100.0, 0.0, 0.0, 0.0]}


def test_a_package_the_registry_no_longer_offers_is_named_with_pips_words(tmp_path, monkeypatch):
    """bigbench==1.0.0 (XSum's source) vanished from the registry: the error said only "no unpacked source tree";
    it now carries pip's own explanation."""
    import subprocess

    from tying.integrations.llm import fetch
    said = "ERROR: No matching distribution found for bigbench==1.0.0"
    monkeypatch.setattr(fetch, "_run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", f"Looking...\n{said}\n"))
    with pytest.raises(fetch.FetchError, match=f"bigbench==1.0.0 gave no source tree to unpack: {said}"):
        fetch.pip_sdist_tree("bigbench==1.0.0", tmp_path / "w")
