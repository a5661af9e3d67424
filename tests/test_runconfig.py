"""The typed run config (integrations/llm/runconfig.py) and what it feeds, without training: the configs in
benchmarks/configs, bad input refused by name before anything is written, a JSONL task's metric, the rate policy,
shards, the committed results regenerated identically from their parts, and result names."""
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from tying.integrations.llm import grid, metrics, report, tasks
from tying.integrations.llm.rates import Rates, load_table, sweep_results, sweep_table
from tying.integrations.llm.runconfig import ConfigError, load_config

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
QUICK = CONFIGS / "quick.yaml"


def test_every_config_loads_and_quick_is_the_quick_job():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"quick", "full", "gpu", "paper", "seeded"} <= set(names)
    for name in names:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        if cfg.rates.table:
            load_table(cfg.rates.table)
    q = load_config(QUICK)
    # the quick job of before this config (the QUICK dict): the same size, so the README's first command still is
    assert ([t.name for t in q.tasks], q.configs, q.ranks, q.seeds, q.steps, q.n_train, q.n_test, q.batch) == (
        ["nli"], ["lora", "tl6", "vera"], [8], [0], 30, 120, 60, 4)
    rates = Rates(q)
    assert {c: rates("nli", c, 8) for c in q.configs} == {
        "lora": (0.01, "table"), "tl6": (0.003, "table"), "vera": (0.03, "table")}
    assert rates("nli", "lora", 64) == (0.003, "table")  # the rank-64 sweep's pick
    seeded = load_config(CONFIGS / "seeded.yaml")
    assert len(grid.cells(seeded)) == 5 * 4 + 2 * 2 and len(grid.parts(seeded)) == 5 + 3 * 24


def test_overrides_set_values_and_unknown_keys_name_the_closest(tmp_path):
    cfg = load_config(QUICK, ["out=/x", "steps=3", "ranks=[8,64]", "model.dtype=bfloat16", "rates.lr.tl6=1e-3",
                              "rates.sweep.grid=[0.1]", "shard=2/3"])
    assert (cfg.out, cfg.steps, cfg.ranks, cfg.model.dtype, cfg.rates.lr, cfg.rates.sweep.grid, cfg.shards) == (
        "/x", 3, [8, 64], "bfloat16", {"tl6": 1e-3}, [0.1], (2, 3))
    jsonl = load_config(QUICK, ["tasks=[a.jsonl]", "rates.lr.a.jsonl/tl6=0.03", "rates.lr.a.jsonl/lora/r8=0.1"])
    text = load_config(QUICK, ["out=2024-01-01", "model.name=off"])
    assert (text.out, text.model.name) == ("2024-01-01", "off")  # text, not a YAML date or boolean
    assert load_config(QUICK, ["model.shape=null"]).model.shape is None
    assert jsonl.rates.lr == {"a.jsonl/tl6": 0.03, "a.jsonl/lora/r8": 0.1}  # a file name's dot is not a key path
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICK.read_text().replace("n_test: 60", "n_tset: 60"))
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key n_tset; did you mean 'n_test'\?"):
        load_config(bad)
    bad.write_text(QUICK.read_text().replace("  name: smollm2-135m", "  nmae: smollm2-135m"))
    with pytest.raises(ConfigError, match=r"unknown key model.nmae; did you mean 'model.name'\?"):
        load_config(bad)
    for override, match in [
            ("stpes=3", r"override 'stpes=3': no key stpes; did you mean 'steps'\?"),
            ("model.dtpye=bfloat16", r"no key model.dtpye; did you mean 'model.dtype'\?"),
            ("rates.swep.grid=[1]", r"no key rates.swep; did you mean 'rates.sweep'\?"),
            ("tasks=[{name: a.jsonl, metrc: f1}]", r"unknown key tasks\[0\].metrc; did you mean 'tasks\[0\].metric'\?"),
            ("steps", r"write KEY=VALUE"),
            ("steps=0", r"steps: Input should be greater than or equal to 1"),
            ("rates.lr={tl6: .nan}", r"rates.lr.tl6: Input should be a finite number"),
            ("rates.lr={tl66: 0.1}", r"rates.lr.tl66: no config 'tl66' in this run; did you mean 'tl6'\?"),
            ("rates.lr={squadd/lora: 0.1}", r"no task 'squadd' in this run; did you mean 'squad'\?"),
            ("tasks=[nli, {name: nli, metric: f1}]", r"a task is named twice"),
            ("tasks=[{name: nli, metric: f1}]", r"nli is a built-in task .* for .jsonl tasks"),
            ("tasks=[{name: a.jsonl, metric: blue}]",
             r"tasks\[0\].metric: Input should be 'exact_match', 'f1', 'bleu', 'chrf', 'rouge' or 'accuracy'"),
            ("shard=3/2", r"shard 3/2: give K/N with 1 <= K <= N"), ("shard=0/2", "shard 0/2"),
            ("shard=half", "shard half"), ("also=[{tasks: [squad], configs: [lora], ranks: [64]}]",
                                          r"also\[0\].tasks: 'squad' is not one of tasks")]:
        with pytest.raises(ConfigError, match=match):
            load_config(QUICK, [override])


def test_shard_auto_reads_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert load_config(QUICK, ["shard=auto"]).shards == (2, 4)
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="RANK and WORLD_SIZE, which are not set"):
        load_config(QUICK, ["shard=auto"])


def test_torchrun_processes_each_take_their_gpu(monkeypatch, tmp_path):
    """shard=auto under torchrun: process RANK of WORLD_SIZE runs its share on cuda:LOCAL_RANK, in bfloat16."""
    from tying.integrations.llm import parts
    seen = []
    monkeypatch.setattr(parts, "check_device", lambda device, dtype: seen.append((device, str(dtype))))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    cfg = parts.prepare(load_config(QUICK, ["model.device=cuda", "shard=auto", f"out={tmp_path / 'o'}"]))
    assert (cfg.model.device, cfg.model.dtype, cfg.shards) == ("cuda:3", "bfloat16", (4, 8))
    assert seen == [("cuda:3", "torch.bfloat16")] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_every_part(n):
    cfg = load_config(CONFIGS / "seeded.yaml")
    every = [p.name for p in grid.parts(cfg)]
    shares = [[p.name for p in grid.shard(load_config(CONFIGS / "seeded.yaml", [f"shard={k}/{n}"]),
                                                       grid.parts(cfg))] for k in range(1, n + 1)]
    assert sorted(x for s in shares for x in s) == sorted(every) and len(set(every)) == len(every)


def test_a_jsonl_task_with_long_answers_is_not_scored_by_exact_match_alone(tmp_path):
    """A user's translation file scored 0 everywhere by exact match (with 32 new tokens at most): without a metric,
    long answers default to chrF, and a metric named is used as the headline, with its per-example scores."""
    long = tmp_path / "de-en.jsonl"
    long.write_text("".join(json.dumps({"prompt": f"Translate: Satz {i}", "answer": f"This is the sentence number {i} "
                                        "of the test."}) + "\n" for i in range(20)))
    task = tasks.get_task(str(long))
    assert task.metric == "chrf" and task.max_new_tokens is None  # sized to the answers by the run, not 32
    got = task.score(["This is the sentence number 1"], ["This is the sentence number 1 of the test."])
    assert 0 < got["chrf"] < 100 and got["per_example"][0] > 0
    short = tmp_path / "labels.jsonl"
    short.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "yes" if i % 2 else "no"}) + "\n"
                             for i in range(20)))
    assert tasks.get_task(str(short)).metric == "exact_match"
    assert tasks.default_metric(["a b c d e"] * 9 + ["a"])[0] == "chrf"
    for name, (_, key) in metrics.METRICS.items():
        scored = tasks.get_task(str(long), metric=name).score(["This is it"], ["This is it."])
        assert scored[key] == pytest.approx(100.0) or name in ("bleu", "chrf", "rouge")
        assert tasks.get_task(str(long), metric=name).metric == key and len(scored["per_example"]) == 1
    assert metrics.f1_score(["the cat sat"], ["the cat sat on the mat"])["per_example"] == [pytest.approx(200 / 3)]
    assert metrics.label_score(["Positive!", "it is negative", "unsure", "NEGATIVE"],
                               ["positive", "negative", "positive", "positive"])["per_example"] == [100, 100, 0, 0]


def test_the_report_headline_is_the_tasks_metric(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a long answer of several words"}) + "\n"
                             for i in range(10)))
    cfg = load_config(QUICK, [f"out={tmp_path / 'o'}", f"tasks=[{{name: {jsonl}, metric: chrf, max_new_tokens: 40}}]",
                              "configs=[lora, tl6]", "seeds=[0, 1]", "rates.lr={lora: 0.01, tl6: 0.01}"])
    (tmp_path / "o" / "parts").mkdir(parents=True)
    for part in grid.parts(cfg):
        per = [10.0 * (part.seed + 1) + (5.0 if part.config == "tl6" else 0.0)] * 4
        row = {**part.row(), "lr": 0.01, "trainable": 10, "seconds": 1.0, "score": per[0],
               "metrics": {"chrf": per[0], "exact_match": 0.0, "per_example": per}}
        (tmp_path / "o" / "parts" / f"{part.name}.json").write_text(json.dumps(row))
    found = report.write(cfg, Rates(cfg), plots=False)
    assert len(found) == 5 and {report.row_metric(r) for r in found} == {"chrf"}
    md = (tmp_path / "o" / "reproduce.md").read_text()
    assert "| mine.jsonl | chrf | tl6 | 8 | 1 | 25.00 |" not in md and f"| {jsonl} | chrf | tl6 | 8 | 1 | 25.00 |" in md
    assert f"| {jsonl} | tl6 | 8 | 2 | 20.0 ± 7.1 | +5.0 [+5.0, +5.0] |" in md  # intervals on chrF, not on EM's zeros
    # a part scored by another metric (or by the old default, exact match) is not this run's
    stale = tmp_path / "o" / "parts" / "mine.jsonl-tl6-r8-s0.json"
    stale.write_text(json.dumps({k: v for k, v in json.loads(stale.read_text()).items() if k != "metric"}))
    assert len(report.write(cfg, Rates(cfg), plots=False)) == 4


def test_the_rate_policy(tmp_path, capsys):
    table = tmp_path / "t.yaml"
    table.write_text("swept_on: [nli]\nlr: {lora: 0.01, tl6: 0.003, tl6/r64: 0.02}\n")
    base = [f"out={tmp_path / 'o'}", f"rates.table={table}", "tasks=[nli, squad]", "configs=[lora, tl6, tl5]"]
    r = Rates(load_config(QUICK, [*base, "rates.lr={squad/lora: 0.1, tl5: 0.2}"]))
    assert r("squad", "lora", 8) == (0.1, "rates.lr") and r("nli", "tl5", 8) == (0.2, "rates.lr")
    assert r("nli", "tl6", 8) == (0.003, "table") and r("nli", "tl6", 64) == (0.02, "table")
    assert r("squad", "tl6", 8) == (None, "sweep")  # a task the table was not swept on gets swept by default
    off = load_config(QUICK, [*base, "rates.sweep=null", "configs=[lora, tl6]"])
    assert Rates(off)("squad", "tl6", 8) == (0.003, "table, swept on another task")
    Rates(off).check(off)
    assert re.search(r"warning: squad: the rates of lora r8, tl6 r8 come from the table .*t.yaml, swept on nli, "
                     r"not on squad", capsys.readouterr().out)
    none = load_config(QUICK, [*base, "rates.sweep=null"])
    with pytest.raises(ConfigError, match=r"no learning rate for nli/tl5/r8, squad/tl5/r8"):
        Rates(none).check(none)
    sharded = load_config(QUICK, [*base, "shard=1/2"])
    with pytest.raises(ConfigError, match=r"shard 1/2, stage all: no swept rate yet for squad/tl6/r8 \(not swept\)"):
        Rates(sharded).check(sharded)
    with pytest.raises(ConfigError, match="no such rate table"):
        Rates(load_config(QUICK, [f"rates.table={tmp_path / 'none.yaml'}"]))


def test_held_out_sweep_examples_are_never_test_examples(tmp_path):
    """The sweep scores held-out training examples; for a JSONL task the old sweep split the file with the sweep's
    size as the test size, so held-out examples could be the run's test examples."""
    from tying.integrations.llm.parts import data_of
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(40)))
    part = grid.parts(load_config(QUICK, [f"tasks=[{path}]", "n_train=10", "n_test=12"]))[0]
    task = tasks.get_task(str(path))
    _, test = data_of(part, task)
    sweep_train, held = data_of(part, task, val=4)
    assert len(held) == 4 and not {e["prompt"] for e in held} & {e["prompt"] for e in test}
    assert not {e["prompt"] for e in sweep_train} & {e["prompt"] for e in held}


# ---------------------------------------------------------------- committed results
SEEDED = [("llm-seeded", "seeded"), ("llm-long-translation", "long-translation"), ("llm-long-xsum", "long-xsum")]
# reproduce-quick: quick.yaml's committed reference run (the job itself writes to an ignored out/reproduce-quick)
OLDER = [("reproduce-quick", "quick", []), ("kinds-quick", "kinds", []),
         ("reproduce-precision/float32", "quick", []), ("reproduce-precision/bfloat16", "quick", ["model.dtype=bfloat16"])]


@pytest.mark.parametrize("folder, config, extra", [(f, c, []) for f, c in SEEDED] + OLDER, ids=lambda x: str(x))
def test_committed_results_report_identically_from_their_parts(tmp_path, folder, config, extra, capsys):
    """Each committed result regenerated from its committed parts under its config: the same rows; the same
    reproduce.md byte for byte where it was written in the current format (the seeded results)."""
    src = ROOT / "benchmarks" / "results" / folder
    shutil.copytree(src / "parts", tmp_path / "parts")
    cfg = load_config(CONFIGS / f"{config}.yaml", [f"out={tmp_path}", *extra])
    if cfg.rates.sweep and cfg.rates.sweep.file:  # the committed sweep, copied: the test writes only under tmp_path
        shutil.copy(cfg.rates.sweep.file, tmp_path / "lr_sweep.json")
        cfg = load_config(CONFIGS / f"{config}.yaml", [f"out={tmp_path}", f"rates.sweep.file={tmp_path / 'lr_sweep.json'}"])
        sweep_table(cfg, sweep_results(cfg))
        assert (tmp_path / "lr_sweep.md").read_text() == (ROOT / "benchmarks/results/llm-seeded-sweep/lr_sweep.md").read_text()
    found = report.write(cfg, Rates(cfg), plots=False)
    assert found == json.loads((src / "reproduce.json").read_text())["rows"]
    if (folder, config) in SEEDED:
        assert (tmp_path / "reproduce.md").read_text() == (src / "reproduce.md").read_text()
    capsys.readouterr()


def _git_ignores(path: str) -> bool:
    """Whether git ignores ``path`` (relative to the repository root) in this checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False).returncode == 0


def test_the_quick_job_writes_to_an_ignored_folder_not_over_its_committed_run():
    """README's first command ran the quick job into benchmarks/results/reproduce-quick, rewriting the committed
    reference run (7 files, a plot more): a fresh clone was dirty. It writes to an ignored folder now."""
    out = load_config(QUICK).out
    for written in ("reproduce.json", "reproduce.md", "reproduce.png", "reproduce-loss.png", "parts/nli-tl6-r8-s0.json",
                    "adapters/nli-tl6-r8-s0/adapter.safetensors"):
        assert _git_ignores(f"{out}/{written}"), f"{out}/{written}"
    assert (ROOT / "benchmarks/results/reproduce-quick/reproduce.json").is_file()  # the reference run stays


def test_paper_params_writes_its_committed_results_byte_for_byte(tmp_path, monkeypatch, capsys):
    """README's first command also runs paper_params.py, which wrote the seconds it took into the committed JSON."""
    spec = importlib.util.spec_from_file_location("paper_params", ROOT / "benchmarks" / "paper_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr("sys.argv", ["paper_params.py", "--out", str(tmp_path)])
    module.main()
    for name in ("paper_params.json", "paper_params.md"):
        assert (tmp_path / name).read_bytes() == (ROOT / "benchmarks" / "results" / name).read_bytes(), name
    capsys.readouterr()


def test_no_result_or_doc_is_named_after_an_issue():
    named = [p.relative_to(ROOT).as_posix() for top in ("benchmarks/results", "docs")
             for p in (ROOT / top).rglob("*") if "issue" in p.name.lower()]
    assert not named, named


def test_a_sweep_file_at_other_settings_is_not_replaced(tmp_path):
    """seeded.yaml and the long-* configs share one sweep file outside their out: a run at other settings (here
    float32) used to sweep afresh and write its results over the committed sweep."""
    shared = tmp_path / "lr_sweep.json"
    shutil.copy(ROOT / "benchmarks/results/llm-seeded-sweep/lr_sweep.json", shared)
    before = shared.read_bytes()
    cfg = load_config(CONFIGS / "seeded.yaml", [f"out={tmp_path / 'o'}", f"rates.sweep.file={shared}",
                                                "model.dtype=float32"])
    with pytest.raises(ConfigError, match=r"holds a sweep at other settings \(dtype bfloat16 there, float32 here\); "
                                          r"this sweep would replace it: .*rates.sweep.file=.*o/lr_sweep.json"):
        Rates(cfg).check(cfg)
    assert shared.read_bytes() == before
    same = load_config(CONFIGS / "seeded.yaml", [f"out={tmp_path / 'o'}", f"rates.sweep.file={shared}"])
    Rates(same).check(same)  # at its own settings the file is this sweep's: every cell has its pick
    assert Rates(same)("squad", "tl6", 8) == (0.03, "sweep")


def test_the_sweep_table_of_paper_yaml_names_metrics_without_loading_data(tmp_path, capsys):
    """paper.yaml (data: hf) sweeps dialogsum and hellaswag, which have no offline source: the sweep's table names
    each task's metric from the task table, not by loading the task (that raised DataSourceError at the end of
    every sweep, so training never started)."""
    cfg = load_config(CONFIGS / "paper.yaml", [f"out={tmp_path}", f"rates.sweep.file={tmp_path / 'lr_sweep.json'}"])
    results = [{"task": t, "config": "lora", "rank": 8, "lr": lr, "score": s}
               for t in ("dialogsum", "hellaswag") for lr, s in ((1e-4, 10.0), (3e-4, 20.0))]
    sweep_table(cfg, results)
    table = (tmp_path / "lr_sweep.md").read_text()
    assert f"| dialogsum ({tasks.TASKS['dialogsum'].metric}) | lora | 8 |" in table
    assert f"| hellaswag ({tasks.TASKS['hellaswag'].metric}) | lora | 8 |" in table
    capsys.readouterr()
