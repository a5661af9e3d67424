"""Offline metrics for the five task types and for a user's own tasks: each ``score(predictions, references) -> dict``
(0-100 scale), with ``per_example``: the headline metric of each example (0-100), the unit that seeds and bootstrap
intervals resample (:mod:`.stats`). BLEU and chrF are corpus metrics: their ``per_example`` is the sentence score.
:data:`METRICS` names the metrics a JSONL task can choose (``metric:`` in a run config).

``references`` is a list with one entry per prediction: a string, or a list of acceptable strings
(SQuAD's several annotator answers); multi-reference metrics take the best match.
"""

from __future__ import annotations

import collections
import re
import string

NLI_LABELS = ("entailment", "neutral", "contradiction")


def _refs(references) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return float(p == r)  # both empty counts as a match
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def squad_score(predictions, references, per_example: str = "exact_match") -> dict:
    """SQuAD v1.1 exact match and token F1 (max over references), in percent; ``per_example`` holds the one named."""
    _check(predictions, references)
    refs = _refs(references)
    em = [max(normalize_answer(p) == normalize_answer(r) for r in rs) for p, rs in zip(predictions, refs)]
    f1 = [max(_f1(p, r) for r in rs) for p, rs in zip(predictions, refs)]
    n = max(len(predictions), 1)
    return {"exact_match": 100 * sum(em) / n, "f1": 100 * sum(f1) / n, "n": len(predictions),
            "per_example": [100.0 * e for e in (em if per_example == "exact_match" else f1)]}


def f1_score(predictions, references) -> dict:
    """Token F1 as the headline (SQuAD's, max over references; exact match reported beside it)."""
    return squad_score(predictions, references, per_example="f1")


def rouge_score(predictions, references) -> dict:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming), in percent; best over references."""
    _check(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("ROUGE needs rouge-score: pip install 'tying[bench]'") from e
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    vals = [max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(predictions, _refs(references))]
    return {"rougeL": 100 * sum(vals) / max(len(vals), 1), "n": len(vals), "per_example": [100 * v for v in vals]}


def nli_label(text: str) -> str:
    """The first NLI label word in ``text`` (``""`` when none appears)."""
    found = [(m.start(), lab) for lab in NLI_LABELS for m in [re.search(rf"\b{lab}", text.lower())] if m]
    return min(found)[1] if found else ""


def nli_score(predictions, references) -> dict:
    """Accuracy of the first label word (entailment / neutral / contradiction) in each prediction."""
    _check(predictions, references)
    hits = [nli_label(p) == nli_label(r[0] if not isinstance(r, str) else r) for p, r in zip(predictions, references)]
    return _hits("accuracy", hits)


def _hits(name: str, hits: list[bool]) -> dict:
    return {name: 100 * sum(hits) / max(len(hits), 1), "n": len(hits), "per_example": [100.0 * h for h in hits]}


def _sacrebleu(name: str, corpus: str, sentence: str, predictions, references) -> dict:
    """sacreBLEU's ``corpus`` score against one reference per example, ``per_example`` its ``sentence`` score."""
    _check(predictions, references)
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError(f"{name} needs sacrebleu: pip install 'tying[bench]'") from e
    refs = [rs[0] for rs in _refs(references)]
    return {name.lower(): getattr(sacrebleu, corpus)(list(predictions), [refs]).score, "n": len(refs),
            "per_example": [getattr(sacrebleu, sentence)(p, [r]).score for p, r in zip(predictions, refs)]}


def bleu_score(predictions, references) -> dict:
    """Corpus sacreBLEU (default 13a tokenisation) against one reference per example."""
    return _sacrebleu("BLEU", "corpus_bleu", "sentence_bleu", predictions, references)


def chrf_score(predictions, references) -> dict:
    """Corpus chrF (sacreBLEU's chrF2, character n-grams: fair to long answers and to any language) against one
    reference per example; ``per_example`` is sentence chrF."""
    return _sacrebleu("chrF", "corpus_chrf", "sentence_chrf", predictions, references)


def label_score(predictions, references) -> dict:
    """Accuracy of a classification task: a prediction's label is the first of the task's labels (the distinct
    references, normalized as SQuAD does) that it names as whole words; a hit when that is its reference."""
    _check(predictions, references)
    refs = [normalize_answer(rs[0]) for rs in _refs(references)]
    labels = sorted({r for r in refs if r}, key=len, reverse=True)  # at one position the longer label wins

    def label(text: str) -> str | None:
        text = normalize_answer(text)
        found = [(m.start(), i) for i, lab in enumerate(labels) if (m := re.search(rf"\b{re.escape(lab)}\b", text))]
        return labels[min(found)[1]] if found else None

    return _hits("accuracy", [label(p) == r for p, r in zip(predictions, refs)])


def final_number(text: str) -> float | None:
    """The number after the last ``####`` if present, else the last number in ``text``."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", tail)
    if not nums:
        return None
    try:
        return float(nums[0 if "####" in text else -1].replace(",", ""))
    except ValueError:
        return None


def gsm_score(predictions, references) -> dict:
    """Exact match of the final number (GSM8K style: ``#### n``, else the last number)."""
    _check(predictions, references)
    hits = []
    for p, r in zip(predictions, _refs(references)):
        a, b = final_number(p), final_number(r[0])
        hits.append(a is not None and b is not None and abs(a - b) < 1e-6)
    return _hits("exact_match", hits)


def choice_score(predictions, references) -> dict:
    """Accuracy of multiple choice answered by number: the first integer in each prediction against the reference."""
    _check(predictions, references)
    first = [re.search(r"\d+", p) for p in predictions]
    hits = [m is not None and m.group() == (r if isinstance(r, str) else r[0]).strip() for m, r in zip(first, references)]
    return _hits("accuracy", hits)


# a JSONL task's ``metric:`` -> (score function, the headline key of its dict)
METRICS = {"exact_match": (squad_score, "exact_match"), "f1": (f1_score, "f1"), "bleu": (bleu_score, "bleu"),
           "chrf": (chrf_score, "chrf"), "rouge": (rouge_score, "rougeL"), "accuracy": (label_score, "accuracy")}
