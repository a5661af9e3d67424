"""benchmarks/pools.py (issue 37.5): the per-budget configs count what the plan says, and the report turns finished
parts into a table per budget with intervals and the verdicts, from rows of known per-example scores."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("pools_bench", ROOT / "benchmarks" / "pools.py")
pools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pools)


def _row(method, budget, seed, per, task="nli"):
    _, rank, _ = pools.BUDGETS[budget][method]
    return {"task": task, "config": pools.config_name(method, budget), "rank": rank, "seed": seed, "lr": 0.01,
            "trainable": 1000, "metrics": {"per_example": per}}


def test_the_committed_configs_meet_their_budgets():
    """Every method's config counts within its budget's band on SmolLM2's meta twin (as benchmarks/pools.py
    configs printed them), and PEFT's files count what ours do at the same knobs."""
    from tying.integrations.llm.parts import trainable_of
    from tying.integrations.meta_models import meta_model
    model = meta_model(pools.MODEL)
    counts = {(b, m): trainable_of(model, str(ROOT / pools.config_name(m, b)) if "/" in pools.config_name(m, b)
                                   else pools.config_name(m, b), rank)
              for b, methods in pools.BUDGETS.items() for m, (_, rank, _) in methods.items()}
    assert counts["40k", "lora"] == 46_080 and counts["370k", "lora"] == 368_640 and counts["40k", "tl6"] == 41_328
    assert all(30_000 < n < 50_000 for (b, _), n in counts.items() if b == "40k")
    assert all(320_000 < n < 380_000 for (b, _), n in counts.items() if b == "370k")
    for b in pools.BUDGETS:
        for ours, theirs in pools.PAIRS:
            assert counts[b, ours] == counts[b, theirs]


def test_the_report_gives_each_budget_its_table_and_verdicts():
    n = 40
    good, bad = [100.0] * n, [0.0] * (n // 2) + [100.0] * (n // 2)
    found = [_row("lora", "370k", s, bad) for s in range(3)] + [_row("lily", "370k", s, good) for s in range(3)]
    found += [_row("peft-lily", "370k", s, good) for s in range(3)] + [_row("tl6", "370k", s, bad) for s in range(3)]
    found += [_row("lora", "40k", s, good) for s in range(2)] + [{"config": "zero-shot", "rank": 0, "task": "nli"}]
    out = pools.summarise(found)
    got = {(r["budget"], r["method"]): r for r in out["rows"]}
    assert set(got) == {("370k", "lora"), ("370k", "lily"), ("370k", "peft-lily"), ("370k", "tl6"), ("40k", "lora")}
    assert got["370k", "lily"]["mean"] == 100.0 and got["370k", "lora"]["seeds"] == [0, 1, 2]
    assert got["370k", "lora"]["low"] < 50.0 < got["370k", "lora"]["high"]
    claims = {(c["budget"], c["claim"]): c["verdict"] for c in out["claims"]}
    assert claims["370k", "lily >= lora"] == "supported"
    assert claims["370k", "tl6 >= lily"] == "refuted"
    assert claims["370k", "lily agrees with peft-lily (within 10 %)"] == "supported"
    assert ("40k", "lily >= lora") not in claims  # no Lily at 40k: no claim
    text = pools.markdown(out, "header")
    assert "| nli | 370k | lily | lily-370k | 32 |" in text and "hydralora at 40k" in text


def test_the_rate_table_follows_the_kits_rule_and_gives_peft_our_pick(tmp_path):
    from tying.integrations.llm.rates import load_table
    runs = [("lora", 1, 0.01, 40.0), ("lora", 1, 0.03, 50.0), ("lily-40k", 5, 0.01, 30.0), ("lily-40k", 5, 0.03, 30.0),
            ("vb-lora-40k", 2, 0.01, 20.0), ("vb-lora-40k", 2, 0.03, 10.0),
            ("lily-370k", 32, 0.01, 1.0), ("lily-370k", 32, 0.03, 2.0), ("vb-lora-370k", 1, 0.01, 3.0),
            ("vb-lora-370k", 1, 0.03, 3.5)]
    sweep = tmp_path / "lr_sweep.json"
    sweep.write_text(json.dumps({"settings": {"n_test": 30, "steps": 12, "batch": 4}, "results": [
        {"task": "nli", "config": f"benchmarks/configs/pools/{c}.yaml" if "-" in c else c, "rank": r, "lr": lr,
         "score": sc} for c, r, lr, sc in runs]}))
    lr = pools.write_table(sweep, tmp_path / "t.yaml")
    assert lr["lora/r1"] == 0.03 and lr["vb-lora-40k/r2"] == 0.01
    assert lr["lily-40k/r5"] == 0.01  # no signal: the smaller rate, and the file says so
    assert lr["peft-lily-40k/r5"] == lr["lily-40k/r5"] and lr["peft-vb-lora-370k/r1"] == lr["vb-lora-370k/r1"] == 0.03
    assert "No signal (every rate scored the same; the smaller rate by the tie rule): lily-40k/r5" in (
        tmp_path / "t.yaml").read_text()
    assert load_table(str(tmp_path / "t.yaml")).swept_on == ["nli"]


def test_one_task_of_the_config_loads_and_keeps_every_cell_of_that_task(tmp_path, monkeypatch):
    from tying.integrations.llm import grid
    from tying.integrations.llm.runconfig import load_config
    config = ROOT / "benchmarks" / "configs" / "pools.yaml"
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the working directory
    both = load_config(config)
    for task in ("nli", "squad"):
        path = tmp_path / f"{task}.yaml"
        path.write_text(pools.one_task(config, task, sweep=task == "nli"))
        one = load_config(path)
        assert grid.cells(one) == [c for c in grid.cells(both) if c[0] == task]
        assert one.n_test_of(one.tasks[0]) == both.n_test_of(both.task(task))
    assert one.rates == both.rates and len(grid.cells(one)) == 16
