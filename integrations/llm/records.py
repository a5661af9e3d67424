"""The kit's records: what every task source builds (an example, ``{"prompt", "answer"}``, optionally
``"references"``; the prompt of each built-in task type; answer clean-up; the :class:`Task` record), and the
:class:`Part` a run is made of (one config on one task at one seed). Below :mod:`.tasks` (the packaged sources),
:mod:`.hf_data` (the Hugging Face copies), which build the same examples from their own files, and :mod:`.grid`,
which builds the parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

Example = dict  # {"prompt": str, "answer": str, optionally "references": list[str]}
TEST_SEED = 0  # fixes every train/test split


def first_line(text: str) -> str:
    """The first non-empty line, stripped."""
    return next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")


_LABEL = re.compile(r"^(english|translation|summary|answer)\s*:\s*", re.IGNORECASE)


def clean_answer(text: str) -> str:
    """The first line without a leading ``English:``/``Summary:``/``Answer:`` label or wrapping quotes."""
    line = _LABEL.sub("", first_line(text))
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line


def squad_example(context: str, question: str, answers: list[str]) -> Example:
    """A SQuAD example (any source): the first answer is the target, all of them the references."""
    prompt = ("Answer with a short span copied from the passage.\n\n"
              f"Passage: {context}\n\nQuestion: {question.strip()}")
    return {"prompt": prompt, "answer": answers[0], "references": list(answers)}


def summary_example(text: str, summary: str, max_words: int = 100, kind: str = "article") -> Example:
    """A summarization example (XSum articles; ``kind="dialogue"`` for DialogSum): text cut to ``max_words``."""
    words = text.split()
    cut = " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")
    return {"prompt": f"Summarize the {kind} in one sentence.\n\n{kind.capitalize()}: {cut}", "answer": summary.strip()}


def nli_example(premise: str, hypothesis: str, label: str) -> Example:
    """An SNLI example (any source); ``label`` is entailment, neutral or contradiction."""
    prompt = (f"Premise: {premise.strip()}\nHypothesis: {hypothesis.strip()}\n"
              "Does the premise entail the hypothesis? Answer with one word: entailment, neutral or contradiction.")
    return {"prompt": prompt, "answer": label}


def choice_example(context: str, endings: list[str], label: int) -> Example:
    """A HellaSwag-style example: pick the ending (numbered from 1) that continues ``context`` best."""
    options = "\n".join(f"{i + 1}. {e.strip()}" for i, e in enumerate(endings))
    prompt = (f"Pick the most plausible continuation. Answer with its number.\n\nContext: {context.strip()}\n\n"
              f"{options}")
    return {"prompt": prompt, "answer": str(int(label) + 1)}


def translation_example(german: str, english: str) -> Example:
    """A German -> English example (any source)."""
    return {"prompt": f"Translate from German to English.\n\nGerman: {german.strip()}", "answer": english.strip()}


@dataclass
class Task:
    """A task: ``load(n_train, n_test, seed) -> (train, test)``, ``score(preds, refs)``, answer post-processing."""

    name: str
    load: Callable
    score: Callable
    postprocess: Callable[[str], str] = clean_answer
    max_new_tokens: int | None = 32  # None: sized to the task's answers (a JSONL task, :func:`default_max_new_tokens`)
    metric: str = ""  # the headline key of score()'s dict
    extra: dict = field(default_factory=dict)

    def references(self, examples: list[Example]) -> list:
        """What ``score`` compares predictions with: ``references`` where present, else ``answer``."""
        return [e.get("references", e["answer"]) for e in examples]


def name_of(task: str, config: str, rank: int, seed: int) -> str:
    """A part's file name: a .jsonl task's file name (not its path), a spec file's stem."""
    return f"{Path(task).name}-{Path(config).stem}-r{rank}-s{seed}"


@dataclass(frozen=True, kw_only=True)
class Part:
    """One part of a run: ``config`` at ``rank`` on ``task`` at ``seed`` (zero-shot: config ``"zero-shot"``, rank 0),
    with how it trains and is scored; what :func:`.parts.run_part` needs and what its row records (:meth:`row`).
    ``metric`` and ``max_new_tokens`` are a JSONL task's (a built-in task's come from the task itself)."""

    steps: int
    n_train: int
    batch: int
    model: str
    dtype: str
    data: str | None
    max_len: int
    grad_accum: int
    device: str
    gradient_checkpointing: bool
    gen_batch: int
    n_test: int
    seed: int
    task: str
    metric: str | None = None
    max_new_tokens: int | None = None
    config: str
    rank: int

    @property
    def name(self) -> str:
        """The part's file name under ``<out>/parts/`` (with ``.json``) and ``<out>/adapters/``."""
        return name_of(self.task, self.config, self.rank, self.seed)

    def row(self) -> dict:
        """The part's fields in its row, in the row's order; ``metric`` and ``max_new_tokens`` only for a JSONL task
        (rows of built-in tasks never had them)."""
        row = asdict(self)
        if not self.task.endswith(".jsonl"):
            del row["metric"], row["max_new_tokens"]
        return row
