"""The tasks from the Hugging Face ``datasets`` copies that papers use: the hub, or a local folder of the same files.

``data: hf`` loads the hub dataset of each task; ``data: DIR`` loads ``DIR/<task>/`` (or
``DIR/<the hub id's last part>/``), a folder of split files such as ``train.json``, ``test.parquet``
or ``validation.jsonl``, as ``datasets.load_dataset(folder)`` reads them. Records become examples
through the same builders as the packaged sources (:mod:`.tasks`), so prompts, answers and metrics do
not depend on the source.

| task | hub dataset | train / test split | fields |
|---|---|---|---|
| squad | squad | train / validation | context, question, answers.text |
| xsum | EdinburghNLP/xsum | train / test | document, summary |
| dialogsum | knkarthick/dialogsum | train / test | dialogue, summary |
| nli | stanfordnlp/snli | train / test | premise, hypothesis, label (0-2; -1 skipped) |
| hellaswag | Rowan/hellaswag | train / validation | ctx, endings, label |
| translation | iwslt2017 (iwslt2017-de-en) | train / test | translation.de, translation.en |
| gsm8k | openai/gsm8k (main) | train / test | question, answer |
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import TyingError
from . import metrics
from . import records as T


class DataSourceError(TyingError, ValueError):
    """A task or dataset source is unknown, or a dataset lacks a split or a field."""


@dataclass(frozen=True)
class Source:
    """A hub dataset: ``hub`` id and ``config``, its train/test splits, required fields, record -> example."""

    hub: str
    config: str | None
    splits: tuple[str, str]
    fields: tuple[str, ...]
    example: Callable[[dict], dict | None]


_NLI = {0: "entailment", 1: "neutral", 2: "contradiction"}
SOURCES = {
    "squad": Source("squad", None, ("train", "validation"), ("context", "question", "answers"),
                    lambda r: T.squad_example(r["context"], r["question"], r["answers"]["text"])),
    "xsum": Source("EdinburghNLP/xsum", None, ("train", "test"), ("document", "summary"),
                   lambda r: T.summary_example(r["document"], r["summary"])),
    "dialogsum": Source("knkarthick/dialogsum", None, ("train", "test"), ("dialogue", "summary"),
                        lambda r: T.summary_example(r["dialogue"], r["summary"], 200, kind="dialogue")),
    "nli": Source("stanfordnlp/snli", None, ("train", "test"), ("premise", "hypothesis", "label"),
                  lambda r: T.nli_example(r["premise"], r["hypothesis"], _NLI[r["label"]]) if r["label"] in _NLI
                  else None),
    "hellaswag": Source("Rowan/hellaswag", None, ("train", "validation"), ("ctx", "endings", "label"),
                        lambda r: T.choice_example(r["ctx"], r["endings"], int(r["label"]))
                        if str(r["label"]).strip() else None),
    "translation": Source("iwslt2017", "iwslt2017-de-en", ("train", "test"), ("translation",),
                          lambda r: T.translation_example(r["translation"]["de"], r["translation"]["en"])),
    "gsm8k": Source("openai/gsm8k", "main", ("train", "test"), ("question", "answer"),
                    lambda r: {"prompt": r["question"].strip(), "answer": r["answer"].strip()}),
}
assert set(metrics.NLI_LABELS) == set(_NLI.values())


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataSourceError("data: hf or a folder needs the datasets package: pip install datasets (or 'tying[bench]')") from e
    return datasets


def folder_of(task: str, data: str) -> Path:
    """The local folder of ``task`` under ``data``: ``data/<task>`` or ``data/<last part of the hub id>``."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataSourceError(f"data {data!r}: no such folder; give 'hf' (the hub) or a folder holding "
                              f"one sub-folder per task ({', '.join(SOURCES)})")
    names = dict.fromkeys([task, SOURCES[task].hub.rsplit("/", 1)[-1]])
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataSourceError(f"data {data!r}: no folder {' or '.join(str(root / n) for n in names)} for task "
                          f"{task!r}; write its split files ({', '.join(SOURCES[task].splits)}) there as json or parquet")


def load_splits(task: str, data: str) -> dict:
    """``{split: datasets.Dataset}`` of ``task``'s train and test splits from the hub or a local folder,
    checked for the splits and fields the task reads (:class:`DataSourceError` names what is missing)."""
    if task not in SOURCES:
        raise DataSourceError(f"tasks {task!r}: no Hugging Face source; choose from {', '.join(SOURCES)}")
    src, ds = SOURCES[task], _datasets()
    where = src.hub if data == "hf" else str(folder_of(task, data))
    try:
        loaded = ds.load_dataset(src.hub, src.config) if data == "hf" else ds.load_dataset(where)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataSourceError(f"data {data} for task {task!r}: {where} could not be loaded "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    out = {}
    for split in src.splits:
        if split not in loaded:
            raise DataSourceError(f"data {data} for task {task!r}: {where} has no {split!r} split (found "
                                  f"{', '.join(loaded) or 'none'}); add a {split}.json or {split}.parquet file")
        missing = [f for f in src.fields if f not in loaded[split].column_names]
        if missing:
            raise DataSourceError(f"data {data} for task {task!r}: the {split!r} split of {where} lacks the "
                                  f"field(s) {', '.join(missing)} (has {', '.join(loaded[split].column_names)}); "
                                  f"each record needs {', '.join(src.fields)}")
        out[split] = loaded[split]
    return out


def _draw(dataset, example: Callable, n: int | None, seed: int) -> list[dict]:
    """``n`` examples from records in a ``seed``-shuffled order, skipping records without a target."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        if n is not None and len(out) >= n:
            break
        ex = example(dataset[i])
        if ex is not None:
            out.append(ex)
    return out


def load(task: str, data: str, n_train: int | None = 1000, n_test: int | None = 200, seed: int = 0):
    """``(train, test)`` example lists of ``task`` from ``data`` ("hf" or a folder). Test examples are
    always drawn with seed 0 (a fixed test set); ``seed`` draws the training examples."""
    splits = load_splits(task, data)
    (train_split, test_split), example = SOURCES[task].splits, SOURCES[task].example
    return _draw(splits[train_split], example, n_train, seed), _draw(splits[test_split], example, n_test, T.TEST_SEED)


def task(base: T.Task, data: str) -> T.Task:
    """``base`` (a :data:`.tasks.TASKS` entry) reading its examples from ``data`` instead of its packaged source."""
    if base.name not in SOURCES:
        raise DataSourceError(f"tasks {base.name!r}: no Hugging Face source; choose from {', '.join(SOURCES)}")

    def load_(n_train=1000, n_test=200, seed=0):
        return load(base.name, data, n_train, n_test, seed)
    return dataclasses.replace(base, load=load_, extra={**base.extra, "data": data})
