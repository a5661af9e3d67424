"""Evidence for compress_peft (issue 38): eight PEFT LoRAs of SmolLM2-135M-Instruct on distinct tasks, compressed
jointly at several shared ranks; each task's score with its compressed adapter against its own LoRA, the update
error, bytes on disk and resident, and the served throughput of one mixed batch of all tasks.

    python benchmarks/compress.py [--stage all|train|own|compress|eval|speed|zero-shot|report] [--ranks 8 16 32 64]
                                  [--steps 40] [--batch 4] [--n-test 80] [--reps 7] [--out out/compress]
                                  [--results benchmarks/results/compress]

Stages (each resumable: a finished piece is a file under ``--out``, git-ignored, reused on the next run):

- ``train``: one rank-8 LoRA per task (the kit's ``lora`` preset on q/k/v, ``finetune``, lr 1e-2: the SNLI rate
  table's), exported as a plain PEFT LoRA folder with ``export_peft`` (``<out>/loras/<task>``).
- ``own``: each task's test examples answered with its own LoRA loaded by PEFT (``PeftModel``): per-example scores.
- ``compress``: ``compress_peft`` of the eight folders at each rank (``<out>/compressed/r<R>``).
- ``eval``: each task answered with its compressed adapter, ``tying.load_adapter(folder, task=)``.
- ``speed``: tokens/s of a forward over one batch of 16 rows (two test prompts per task, 64 tokens), contenders
  alternated in each repetition: one LoRA (PEFT, one adapter for the whole batch), PEFT's mixed batch of the eight
  LoRAs (``adapter_names=``), and each compressed adapter served with ``tying.load_adapters_`` + ``tying.adapters``.
- ``zero-shot``: each task answered by the base model alone, for scale.
- ``report``: ``compress.{json,md}`` and ``retention.png`` under ``--results``.

Tasks (built from the offline data the kit fetches; a fixed test split, training drawn from the rest, seed 0):
SNLI three ways (the kit's prompt; another prompt with yes / maybe / no; contradiction or not as true / false),
SQuAD (token F1), German -> English and English -> German sentences (sentence chrF), language identification of
those sentences, and the kind of a SQuAD question (person / date / number / place / other, from its wording).
Scores are means of per-example scores (0-100); retention is the compressed mean / the own LoRA's mean, with a 95 %
paired bootstrap interval over test examples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tying.integrations.compress import compress_peft
from tying.integrations.llm import metrics, tasks
from tying.integrations.llm.finetune import finetune, generate_answers
from tying.integrations.llm.models import load_model
from tying.integrations.llm.parts import adapt
from tying.integrations.peft import export_peft

import tying
from tying.serving import resident_bytes

MODEL = "smollm2-135m"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), float32"
SEED, RANK, LR = 0, 8, 1e-2
SPEED_ROWS, SPEED_LEN = 16, 64
GAIN = 5.0  # points a LoRA must gain over zero-shot for the share of its gain kept to be reported


# ---------------------------------------------------------------- tasks
@dataclass
class Task:
    load: Callable[[int, int], tuple[list, list]]  # (n_train, n_test) -> (train, test)
    score: Callable  # metrics.*_score
    max_new_tokens: int


def _nli(n_train, n_test):
    return tasks.load_nli(n_train, n_test, seed=SEED)


def _relabel(prompt: str, labels: dict):
    def load(n_train, n_test):
        def one(e):
            premise, hypothesis = (ln.split(": ", 1)[1] for ln in e["prompt"].splitlines()[:2])
            return {"prompt": prompt.format(p=premise, h=hypothesis), "answer": labels[e["answer"]]}
        train, test = _nli(n_train, n_test)
        return [one(e) for e in train], [one(e) for e in test]
    return load


def _pairs(n_train, n_test, short=12):
    """German/English sentence pairs of at most ``short`` German words (train, test) from the kit's split."""
    train, test = tasks.load_translation(None, 1000, seed=SEED)
    cut = [[(e["prompt"].split("German: ", 1)[1], e["answer"]) for e in part if
            len(e["prompt"].split("German: ", 1)[1].split()) <= short] for part in (train, test)]
    return cut[0][:n_train], cut[1][:n_test]


def _translate(src: str, dst: str):
    def load(n_train, n_test):
        def one(de, en):
            text, answer = (de, en) if src == "German" else (en, de)
            return {"prompt": f"Translate from {src} to {dst}.\n\n{src}: {text}", "answer": answer}
        return tuple([one(*p) for p in part] for part in _pairs(n_train, n_test))
    return load


def _langid(n_train, n_test):
    rng = random.Random(SEED)

    def one(de, en):
        lang = rng.choice(["German", "English"])
        text = de if lang == "German" else en
        return {"prompt": f"Which language is this sentence in? Answer German or English.\n\n{text}", "answer": lang}
    return tuple([one(*p) for p in part] for part in _pairs(n_train, n_test))


QTYPES = (("person", ("who", "whom", "whose")), ("date", ("when", "what year", "which year")),
          ("number", ("how many", "how much", "how long", "how old")), ("place", ("where",)))


def question_type(question: str) -> str:
    q = question.lower()
    return next((kind for kind, cues in QTYPES if any(f"{c} " in q or q.startswith(c) for c in cues)), "other")


def _qtype(n_train, n_test):
    def one(e):
        question = e["prompt"].rsplit("Question: ", 1)[1]
        return {"prompt": ("What does this question ask for? Answer with one word: person, date, number, place or "
                           f"other.\n\nQuestion: {question}"), "answer": question_type(question)}
    train, test = tasks.load_squad(n_train, n_test, seed=SEED)
    return [one(e) for e in train], [one(e) for e in test]


def _squad(n_train, n_test):
    return tasks.load_squad(n_train, n_test, seed=SEED)


TASKS = {
    "nli": Task(_nli, metrics.nli_score, 8),
    "nli-yn": Task(_relabel("Sentence 1: {p}\nSentence 2: {h}\nIs sentence 2 true, given sentence 1? Answer yes, "
                            "maybe or no.", {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}),
                   metrics.label_score, 6),
    "nli-contra": Task(_relabel("A: {p}\nB: {h}\nCan A and B both be true? Answer true or false.",
                                {"entailment": "true", "neutral": "true", "contradiction": "false"}),
                       metrics.label_score, 6),
    "squad": Task(_squad, metrics.f1_score, 24),
    "de-en": Task(_translate("German", "English"), metrics.chrf_score, 40),
    "en-de": Task(_translate("English", "German"), metrics.chrf_score, 48),
    "langid": Task(_langid, metrics.label_score, 6),
    "qtype": Task(_qtype, metrics.label_score, 6),
}


# ---------------------------------------------------------------- helpers
def base_model():
    model, tok = load_model(MODEL, dtype="float32", device="cpu")
    return model.eval(), tok


def answer(model, tok, task: str, test: list) -> dict:
    t = TASKS[task]
    start = time.perf_counter()
    preds = generate_answers(model, tok, [e["prompt"] for e in test], max_new_tokens=t.max_new_tokens,
                             batch_size=16, postprocess=tasks.clean_answer, threads=1)
    refs = [e.get("references", e["answer"]) for e in test]
    s = t.score(preds, refs)
    return {"per_example": s["per_example"], "score": statistics.fmean(s["per_example"]), "predictions": preds,
            "seconds": time.perf_counter() - start}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name != "compression.json")


# ---------------------------------------------------------------- stages
def train(args, out: Path) -> None:
    for name, t in TASKS.items():
        folder = out / "loras" / name
        if (folder / "adapter_config.json").exists():
            continue
        train_set, _ = t.load(args.steps * args.batch, args.n_test)
        model, tok = base_model()
        adapt(model, "lora", RANK, SEED)
        hist = finetune(model, train_set, tok, steps=args.steps, lr=LR, batch_size=args.batch, seed=SEED,
                        warmup=max(1, args.steps // 10), progress=False)
        export_peft(model, folder, base_model_name_or_path=MODEL_NAME)
        write(out / "train" / f"{name}.json", {"seconds": hist["seconds"], "tokens": hist["tokens"],
                                               "loss_first": statistics.fmean(hist["loss"][:5]),
                                               "loss_last": statistics.fmean(hist["loss"][-5:])})
        print(f"trained {name}: loss {statistics.fmean(hist['loss'][:5]):.2f} -> "
              f"{statistics.fmean(hist['loss'][-5:]):.2f} ({hist['seconds']:.0f} s)", flush=True)


def test_set(task: str, args) -> list:
    return TASKS[task].load(1, args.n_test)[1]


def own(args, out: Path) -> None:
    from peft import PeftModel

    for name in TASKS:
        f = out / "scores" / "own" / f"{name}.json"
        if f.exists():
            continue
        base, tok = base_model()
        model = PeftModel.from_pretrained(base, str(out / "loras" / name)).eval()
        write(f, answer(model, tok, name, test_set(name, args)))
        print(f"own {name}: {json.loads(f.read_text())['score']:.1f}", flush=True)


def zero_shot(args, out: Path) -> None:
    for name in TASKS:
        f = out / "scores" / "base" / f"{name}.json"
        if not f.exists():
            model, tok = base_model()
            write(f, answer(model, tok, name, test_set(name, args)))
            print(f"base {name}: {json.loads(f.read_text())['score']:.1f}", flush=True)


def compress(args, out: Path) -> None:
    for r in args.ranks:
        folder = out / "compressed" / f"r{r}"
        if not (folder / "compression.json").exists():
            start = time.perf_counter()
            compress_peft({n: out / "loras" / n for n in TASKS}, folder, rank=r)
            print(f"compressed at rank {r} ({time.perf_counter() - start:.1f} s)", flush=True)


def evaluate(args, out: Path) -> None:
    for r in args.ranks:
        for name in TASKS:
            f = out / "scores" / f"r{r}" / f"{name}.json"
            if f.exists():
                continue
            model, tok = base_model()
            tying.load_adapter(model, out / "compressed" / f"r{r}", task=name)
            write(f, answer(model, tok, name, test_set(name, args)))
            print(f"rank {r} {name}: {json.loads(f.read_text())['score']:.1f}", flush=True)


def lora_bytes(peft_model) -> int:
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if ".lora_" in n)


def speed(args, out: Path) -> None:
    from peft import PeftModel

    f = out / "speed.json"
    if f.exists():
        return
    names = list(TASKS)
    base, tok = base_model()
    peft = PeftModel.from_pretrained(base, str(out / "loras" / names[0]), adapter_name=names[0]).eval()
    for n in names[1:]:
        peft.load_adapter(str(out / "loras" / n), adapter_name=n)
    peft.set_adapter(names[0])
    served = {}
    for r in args.ranks:
        m, _ = base_model()
        tying.load_adapters_(m, {"c": out / "compressed" / f"r{r}"})
        served[r] = m
    rows = [n for n in names for _ in range(SPEED_ROWS // len(names))]
    prompts = [tasks.render_prompt(tok, e["prompt"]) for n in names for e in test_set(n, args)[:SPEED_ROWS // len(names)]]
    ids = torch.stack([torch.tensor((tok(p, add_special_tokens=False)["input_ids"] * SPEED_LEN)[:SPEED_LEN])
                       for p in prompts])  # every row SPEED_LEN real tokens (a short prompt repeats): no padding
    tokens = ids.numel()

    def tying_forward(r):
        with tying.adapters(served[r], [f"c/{n}" for n in rows]):
            served[r](ids, logits_to_keep=1)

    contenders = {"one LoRA (PEFT)": lambda: peft(input_ids=ids, logits_to_keep=1),
                  "8 LoRAs mixed (PEFT)": lambda: peft(input_ids=ids, adapter_names=rows, logits_to_keep=1),
                  **{f"compressed r{r}": (lambda r=r: tying_forward(r)) for r in args.ranks}}
    per_rep = {k: [] for k in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up
        for rep in range(args.reps):
            order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
            for k in order:
                start = time.perf_counter()
                contenders[k]()
                per_rep[k].append(tokens / (time.perf_counter() - start))
            print(f"speed rep {rep}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in per_rep.items()), flush=True)
    write(f, {"tokens": tokens, "rows": SPEED_ROWS, "seq": SPEED_LEN, "reps": args.reps, "tokens_per_s": per_rep,
              "resident": {"8 LoRAs (PEFT)": lora_bytes(peft), **{f"r{r}": resident_bytes(m) for r, m in served.items()}}})


# ---------------------------------------------------------------- report
def ratio_interval(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) with a 95 % percentile interval from resampling the (paired) test examples."""
    rng, n = random.Random(seed), len(a)
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        sb = sum(b[i] for i in idx)
        ratios.append(sum(a[i] for i in idx) / sb if sb else float("nan"))
    ratios = sorted(x for x in ratios if not math.isnan(x))
    return sum(a) / sum(b), ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]


def verdict(lo: float, hi: float, goal: float = 0.95) -> str:
    return "supported" if lo >= goal else "refuted" if hi < goal else "undecided at this scale"


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def report(args, out: Path, results: Path) -> None:
    def load(kind: str, n: str) -> dict:
        return json.loads((out / "scores" / kind / f"{n}.json").read_text())

    own_scores = {n: load("own", n) for n in TASKS}
    base_scores = {n: load("base", n) for n in TASKS if (out / "scores" / "base" / f"{n}.json").exists()}
    lora_disk = sum(folder_bytes(out / "loras" / n) for n in TASKS)
    sp = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else None
    lora_resident = sp["resident"]["8 LoRAs (PEFT)"] if sp else None
    ranks = {}
    for r in args.ranks:
        folder = out / "compressed" / f"r{r}"
        if not all((out / "scores" / f"r{r}" / f"{n}.json").exists() for n in TASKS):
            continue
        comp = json.loads((folder / "compression.json").read_text())
        per_task = {}
        for n in TASKS:
            c, o = load(f"r{r}", n), own_scores[n]
            ratio, lo, hi = ratio_interval(c["per_example"], o["per_example"])
            per_task[n] = {"score": c["score"], "own": o["score"], "retention": ratio, "low": lo, "high": hi,
                           "verdict": verdict(lo, hi), "relative_error": comp["tasks"][n]["relative_error"],
                           "same_answers": statistics.fmean(float(a == b) for a, b in zip(c["predictions"], o["predictions"]))}
            z = base_scores.get(n)
            if z is not None and o["score"] - z["score"] >= GAIN:  # the share of the LoRA's gain over the base kept
                g = [[x - y for x, y in zip(v["per_example"], z["per_example"])] for v in (c, o)]
                per_task[n]["gain_retention"] = ratio_interval(*g)
        entry = {"tasks": per_task, "disk_bytes": folder_bytes(folder), "disk_ratio": folder_bytes(folder) / lora_disk,
                 "min_retention": min(t["retention"] for t in per_task.values())}
        if sp and f"r{r}" in sp["resident"]:  # a rank added after the speed stage ran has no timings
            entry["resident_bytes"] = sp["resident"][f"r{r}"]
            entry["resident_ratio"] = entry["resident_bytes"] / lora_resident
            tps = sp["tokens_per_s"]
            mine = tps[f"compressed r{r}"]
            entry["speed"] = {"tokens_per_s": summary(mine),
                              "vs one LoRA": summary([a / b for a, b in zip(mine, tps["one LoRA (PEFT)"])]),
                              "vs PEFT mixed": summary([a / b for a, b in zip(mine, tps["8 LoRAs mixed (PEFT)"])])}
        verdicts = {t["verdict"] for t in per_task.values()}
        entry["retention_verdict"] = ("refuted" if "refuted" in verdicts else "supported" if verdicts == {"supported"}
                                      else "undecided at this scale")  # >= 0.95 on every task
        entry["points_all_095"] = all(t["retention"] >= 0.95 for t in per_task.values())
        entry["goal"] = ("not met" if entry["disk_ratio"] > 0.25 or entry["retention_verdict"] == "refuted" else
                         "met" if entry["retention_verdict"] == "supported" else "undecided at this scale")
        ranks[r] = entry
    trained = {n: json.loads((out / "train" / f"{n}.json").read_text()) for n in TASKS}
    res = {"model": MODEL_NAME, "machine": f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores, "
           f"1 thread, torch {torch.__version__}", "seed": SEED, "rank": RANK, "lr": LR, "steps": args.steps,
           "batch": args.batch, "n_test": args.n_test, "tasks": {n: TASKS[n].score.__name__ for n in TASKS},
           "train": trained, "own": {n: s["score"] for n, s in own_scores.items()},
           "zero_shot": {n: s["score"] for n, s in base_scores.items()}, "lora_disk_bytes": lora_disk,
           "lora_resident_bytes": lora_resident,
           "reps": sp["reps"] if sp else None, "speed_shape": f"{SPEED_ROWS} rows x {SPEED_LEN} tokens, 2 rows per task",
           "speed": {k: summary(v) for k, v in sp["tokens_per_s"].items()} if sp else None, "ranks": ranks}
    results.mkdir(parents=True, exist_ok=True)
    (results / "compress.json").write_text(json.dumps(res, indent=1))
    (results / "compress.md").write_text(markdown(res))
    plot(res, results / "retention.png")


def _spread(s: dict) -> str:
    return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"


def markdown(res: dict) -> str:
    names, ranks = list(res["tasks"]), res["ranks"]
    head = (f"Model: {res['model']}; {len(names)} PEFT LoRAs (rank {res['rank']}, q/k/v), each trained {res['steps']} "
            f"steps x batch {res['batch']} at lr {res['lr']:g}, seed {res['seed']}; {res['n_test']} test examples per "
            f"task; {res['machine']}.")
    lines = [head, "", ("**Each task: zero-shot, its own LoRA, and per shared rank its compressed adapter's retention "
                        "[95 % paired bootstrap interval over test examples] (relative update error)**"), "",
             "| " + " | ".join(["task (score)", "train loss (first 5 -> last 5 steps)", "zero-shot", "own LoRA",
                                 *(f"r{r}" for r in ranks)]) + " |", "|---" * (4 + len(ranks)) + "|"]
    for n in names:
        cells = [f"{t['retention']:.2f} [{t['low']:.2f}, {t['high']:.2f}] ({t['relative_error']:.2f})"
                 for t in (e["tasks"][n] for e in ranks.values())]
        zs = res["zero_shot"].get(n)
        tr = res["train"][n]
        lines.append("| " + " | ".join([f"{n} ({res['tasks'][n].removesuffix('_score')})",
                                        f"{tr['loss_first']:.2f} -> {tr['loss_last']:.2f}",
                                        "-" if zs is None else f"{zs:.1f}", f"{res['own'][n]:.1f}", *cells]) + " |")
    lines += ["", ("**Answers identical to the own LoRA's (share of test examples); the share of the LoRA's gain over "
                   f"zero-shot kept [95 %], where it gained at least {GAIN:g} points**"), "",
              "| task | " + " | ".join(f"r{r} same | r{r} gain kept" for r in ranks) + " |",
              "|---" * (1 + 2 * len(ranks)) + "|"]
    for n in names:
        cells = []
        for e in ranks.values():
            t = e["tasks"][n]
            g = t.get("gain_retention")
            cells += [f"{t['same_answers']:.2f}", "-" if g is None else f"{g[0]:.2f} [{g[1]:.2f}, {g[2]:.2f}]"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "**Per shared rank: bytes against the eight LoRAs', throughput of one mixed batch of all tasks, goal**",
              "", ("| rank | disk bytes (ratio) | resident bytes (ratio) | tokens/s (median) | / one LoRA (min / median "
                   "/ max) | / PEFT mixed (min / median / max) | lowest retention | every estimate >= 0.95 | >= 0.95 on every task (intervals) | goal |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r, e in ranks.items():
        s = e.get("speed")
        speed = ([f"{s['tokens_per_s']['median']:.0f}", _spread(s["vs one LoRA"]), _spread(s["vs PEFT mixed"])] if s
                 else ["-"] * 3)
        resident = f"{e['resident_bytes']:,} ({e['resident_ratio']:.2f})" if "resident_bytes" in e else "-"
        lines.append(f"| {r} | {e['disk_bytes']:,} ({e['disk_ratio']:.2f}) | {resident} | " + " | ".join(speed)
                     + f" | {e['min_retention']:.2f} | {'yes' if e['points_all_095'] else 'no'} | {e['retention_verdict']} | "
                     f"{e['goal']} |")
    lines += ["", f"The eight LoRAs: {res['lora_disk_bytes']:,} bytes on disk (adapter files)"
              + (f", {res['lora_resident_bytes']:,} resident (PEFT's lora_A / lora_B)" if res["lora_resident_bytes"] else "")
              + "."]
    if res["speed"]:
        lines.append(f"Tokens/s (median of {res['reps']} alternated repetitions; forward of {res['speed_shape']}): "
                     + ", ".join(f"{k} {v['median']:.0f}" for k, v in res["speed"].items()) + ".")
    lines += [("Retention: the compressed adapter's mean score / its own LoRA's, on the same test examples. Error: "
               "||dW - B G A|| / ||dW|| over the task's modules (compress_peft's report). Goal: retention >= 0.95 on "
               "every task (the interval's lower end, for 'met') at <= 1/4 of the bytes on disk."), ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ranks = list(res["ranks"])
    x = [res["ranks"][r]["disk_ratio"] for r in ranks]
    for n in res["tasks"]:
        ax.plot(x, [res["ranks"][r]["tasks"][n]["retention"] for r in ranks], marker="o", label=n, alpha=0.8)
    for r, xi in zip(ranks, x):
        ax.annotate(f"r{r}", (xi, 0.0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8,
                    xycoords=("data", "axes fraction"))
    ax.axhline(0.95, color="grey", ls="--", lw=1)
    ax.axvline(0.25, color="grey", ls=":", lw=1)
    ax.set_xlabel("bytes on disk / the eight LoRAs'")
    ax.set_ylabel("retention (compressed / own LoRA)")
    ax.set_title(f"{len(res['tasks'])} LoRAs of SmolLM2-135M compressed jointly")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


STAGES = {"train": train, "own": own, "compress": compress, "eval": evaluate, "speed": speed, "zero-shot": zero_shot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["all", *STAGES, "report"], default="all")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n-test", type=int, default=80)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="out/compress")
    ap.add_argument("--results", default="benchmarks/results/compress")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.ranks = sorted(set(args.ranks))
    out = Path(args.out)
    for name, fn in STAGES.items():
        if args.stage in ("all", name):
            fn(args, out)
    if args.stage in ("all", "report"):
        report(args, out, Path(args.results))


if __name__ == "__main__":
    main()
