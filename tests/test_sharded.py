"""Sharded models, 2 processes on gloo (CPU). FSDP2 by hand (tests/fsdp_worker.py): save_adapter and load_adapter on
a sharded model, full and sharded state dicts through torch.distributed.checkpoint, the placement rule of tied
factors, a 4-bit base, bad input. Tensor parallelism (tests/tp_worker.py): factors that follow the split, refusals.
Each launch runs several scenarios; the tests read what each process recorded."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.fsdp
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

pytestmark = pytest.mark.skipif(not hasattr(torch.distributed.fsdp, "fully_shard"), reason="FSDP2 is public from 2.6")


def launch(out: Path, *scenarios: str, worker: str = "fsdp_worker.py") -> dict:
    """tests/fsdp_worker.py (or ``worker``) under torchrun with 2 processes; {scenario: {rank: record}}."""
    pytest.importorskip("numpy", reason="torch.distributed needs numpy")
    pytest.importorskip("transformers")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / worker), str(out), *scenarios]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "result.json").read_text())
    for name, ranks in results.items():
        for rank, record in ranks.items():
            assert "crash" not in record, (name, rank, record["crash"])
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-trained")
    scenarios = ["tl6", "tied", "tasks"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        scenarios.append("nf4")
    return out, launch(out, *scenarios)


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-edges")
    return out, launch(out, "dcp", "placement", "bad_input")


@pytest.mark.parametrize("kind", ["tl6", "tied", "tasks"])
def test_save_adapter_from_fsdp2_matches_one_process_and_loads_back(trained, kind):
    """Tied across layers and q/k/v (tl6), with tied input/output embeddings and a site on lm_head (tied), across
    tasks (tasks): after 3 steps under FSDP2 (blocks, then the root; factors sharded DTensors) every process's
    save_adapter returns the folder process 0 wrote; it equals a one-process run (1e-5), and load_adapter into a fresh
    sharded model gives the same factors and the same logits. (Before: RuntimeError: Attempted to access the data
    pointer on an invalid python storage; load: aten.copy_.default got mixed torch.Tensor and DTensor.) merge_ on the
    sharded model is refused, nothing changed."""
    import fsdp_worker as w

    out, results = trained
    records = results[kind]
    assert records["0"]["sharded"] == "DTensor"
    assert records["0"]["folder"] == records["1"]["folder"] == str(out / kind)
    got, ref = load_file(str(out / kind / "adapter.safetensors")), w.reference(kind)
    start = w.whole(w.adapted(kind, shard=False))
    assert sorted(got) == sorted(ref) and any(not torch.equal(ref[k], start[k]) for k in ref)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k
    for r in records.values():
        assert r["loaded"] == 0.0 and r["forward"] < 1e-6
        # merge_ edited sharded weights with collectives in between (and a later unmerge_ failed half done)
        assert r["merge"]["error"] == "NotMergeableError" and "sharded" in r["merge"]["message"]
        assert r["merge_unchanged"] == 0.0


def test_a_4bit_base_under_fsdp2_trains_saves_and_loads(trained, tmp_path):
    """QLoRA + FSDP on the CPU: a bitsandbytes nf4 base with bfloat16 quant storage (as transformers loads it with
    BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)), tl6 factors in float32: FSDP2 shards the packed 4-bit
    weights (bfloat16 DTensors) and the factors; after 3 steps the adapter equals one process's (1e-5: bfloat16
    compute on two half batches) and loads back exactly."""
    pytest.importorskip("bitsandbytes")
    import fsdp_worker as w

    out, results = trained
    records = results["nf4"]
    assert records["0"]["base"] == ["Linear4bit", "DTensor", "torch.bfloat16"] and records["0"]["sharded"] == "DTensor"
    got, ref = load_file(str(out / "nf4" / "adapter.safetensors")), w.reference("nf4", tmp_path / "base")
    start = w.whole(w.adapted("nf4", shard=False))
    assert sorted(got) == sorted(ref) and all(t.dtype == torch.float32 for t in got.values())
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-3  # trained (v starts at zero)
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5  # 2.4e-6 measured
    for r in records.values():
        assert r["loaded"] == 0.0 and r["forward"] < 1e-6
        # what does not run: in eval mode on a CPU, bitsandbytes 0.50 repacks 4-bit weights into its inference layout
        # inside the forward, which fails on FSDP2's gathered weights (train mode, as the Trainer trains, works)
        assert r["eval"]["error"] == "RuntimeError" and "is invalid for input of size" in r["eval"]["message"]


def test_full_and_sharded_state_dicts_through_dcp(edges):
    """get_model_state_dict / set_model_state_dict with a full state dict (rank 0 holds it, broadcast on set) and a
    sharded one (dcp.save to a folder, dcp.load): base keys as the plain model names them, factors and logits back
    exactly. (Before: the full set failed on ...q_proj.base.weight, missing on rank 1 and a Tensor/DTensor mix on
    rank 0.) torch's ignore_frozen_params=True is not supported on an adapted model: torch names frozen parameters by
    their module path (q_proj.base.weight), which the state dict does not have, and pops it (docs)."""
    _, results = edges
    for rank, r in results["dcp"].items():
        assert r["full"] == 0.0 and r["sharded"] == 0.0 and r["forward"] < 1e-6, rank
        assert r["ignore_frozen"]["error"] == "KeyError" and ".base." in r["ignore_frozen"]["message"]
    full = results["dcp"]["0"]
    assert "model.layers.0.self_attn.q_proj.weight" in full["full_keys"] and not full["base_keys"]
    assert "tying_bank.A.model:layers:*:self_attn:*" in full["full_keys"]


def test_a_sharded_checkpoint_folder_read_as_an_adapter_folder_is_refused(edges):
    """A torch.distributed.checkpoint folder given to load_adapter: an AdapterFileError that says what it is and how
    to load it, on every process; nothing changes."""
    _, results = edges
    for r in results["dcp"].values():
        assert r["dcp_as_adapter"]["error"] == "AdapterFileError"
        assert "sharded torch.distributed.checkpoint folder" in r["dcp_as_adapter"]["message"]
        assert r["dcp_as_adapter_unchanged"] == 0.0


def test_wraps_that_break_the_placement_rule_are_clear_errors(edges):
    """A tied factor lives in the root's FSDP group. A factor dict sharded alone, the bank in a list with one block
    (its tied factors would be gathered only around that block), or blocks sharded without the root (the factors in
    no group: gradients never reduced, each process training its own copy, silently): a ShardingError at the first
    forward, save_adapter and load_adapter, naming the factor and what to do; the bank alone is torch's own refusal.
    apply_ and load_adapter after fully_shard: refused, the model unchanged."""
    _, results = edges
    for r in results["placement"].values():
        assert "containers that do not implement forward" in r["bank_alone"]["message"]
        for case in ("factor_alone_forward", "factor_alone_save", "with_block_forward"):
            assert r[case]["error"] == "ShardingError", (case, r[case])
            message = r[case]["message"]
            assert "FSDP group of its own" in message and "A.model:layers:*:self_attn:*" in message
        assert "fully_shard the blocks, then the root" in r["with_block_forward"]["message"]
        for case in ("no_root_forward", "no_root_load"):
            assert r[case]["error"] == "ShardingError" and "would not be reduced" in r[case]["message"], case
        for case in ("apply_after", "load_after"):
            assert r[case]["error"] == "ShardingError" and "first, then fully_shard" in r[case]["message"], case
        assert r["unchanged"] == 0.0 and not r["bank_left"] and not r["never_written"]


def test_a_failed_save_or_load_on_a_sharded_model_raises_everywhere_and_changes_nothing(edges):
    """A save into a path that is a file: process 0's error is raised by every process (none waits for a folder that
    will not come), the file is kept; a folder of another spec: refused on every process, the model unchanged."""
    _, results = edges
    for r in results["bad_input"].values():
        assert r["save_to_file"]["error"] == "AdapterFileError" and "is a file" in r["save_to_file"]["message"]
        assert r["file_kept"]
        assert r["other_spec"]["error"] == "AlreadyAppliedError" and r["unchanged"] == 0.0


# ---- tensor parallelism -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    pytest.importorskip("torch.distributed.tensor.parallel")
    out = tmp_path_factory.mktemp("tp")
    return out, launch(out, "hf_tl6", "torch_all", "refusals", worker="tp_worker.py")


@pytest.mark.parametrize("scenario", ["hf_tl6", "torch_all"])
def test_factors_follow_the_tensor_parallel_split_and_train_as_one_process(tp, scenario):
    """Split first (transformers' tp_plan="auto", or torch's parallelize_module; q/k/v/gate/up colwise, o/down
    rowwise), then apply_: A tied across layers and q/k/v is whole (colwise sites), B tied across the layers of each
    projection is split by rows under colwise and whole under rowwise, A of o/down split by columns. After 3 steps
    the adapter equals a one-process run on the model not split (1e-5; every factor moved in 'torch_all'); it loads
    back into a split model and into one not split with the same logits; merge_ is refused, nothing changed."""
    import fsdp_worker as f
    import tp_worker as w

    import tying

    _, results = tp
    kind = scenario.split("_")[1]
    r = results[scenario]["0"]
    places = r["placements"]
    if kind == "tl6":
        assert places["A.model:layers:*:self_attn:*"] == "(Replicate(),)"
        assert places["B.model:layers:*:self_attn:q_proj"] == "(Shard(dim=0),)"
    else:
        assert places["A.model:layers:*:self_attn:o_proj"] == places["A.model:layers:*:mlp:down_proj"] == \
            "(Shard(dim=1),)"
        assert places["B.model:layers:*:self_attn:o_proj"] == "(Replicate(),)"
        assert places["v.model:layers:0:mlp:up_proj"] == "(Shard(dim=0),)"
    got, ref = load_file(str(Path(r["folder"]) / "adapter.safetensors")), w.reference(kind)
    start = f.llama()
    tying.apply_(start, w.spec(kind))
    moved = [(ref[k] - v).abs().max().item() for k, v in w.whole(start).items()]
    assert sorted(got) == sorted(ref) and max(moved) > 1e-3 and (kind == "tl6" or min(moved) > 0)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k
    for record in results[scenario].values():
        assert record["loaded"] == 0.0 and record["fresh"] == 0.0 and record["plain"] < 1e-5
        assert record["merge"]["error"] == "NotMergeableError" and record["merge_unchanged"] == 0.0


def test_a_tied_factor_that_cannot_follow_the_split_is_refused(tp):
    """A tied across q/k/v (colwise: whole) and o_proj (rowwise: columns): apply_ raises a ShardingError naming the
    factor, the modules and both splits; dropout, kinds other than lora and a weight cut another way (transformers'
    packed gate_up: a _StridedShard, which a plain row split of B would not match) likewise; the model is unchanged.
    Splitting an adapted model is torch's own refusal (apply_ after the split)."""
    _, results = tp
    for r in results["refusals"].values():
        message = r["qkvo"]["message"]
        assert r["qkvo"]["error"] == "ShardingError" and "factor A.model:layers:*:self_attn:* is tied across" in message
        assert "self_attn.q_proj and 8 more (colwise: A whole on every process)" in message
        assert "self_attn.o_proj and 2 more (rowwise: A split by columns)" in message
        assert r["dropout"]["error"] == r["ia3"]["error"] == "ShardingError"
        assert "dropout 0.1" in r["dropout"]["message"] and "kind 'ia3'" in r["ia3"]["message"]
        assert r["packed"]["error"] == "ShardingError" and "mlp.gate_proj" in r["packed"]["message"]
        assert "_StridedShard" in r["packed"]["message"]
        assert r["unchanged"] == 0.0 and not r["bank_left"]
        assert r["split_after_apply"]["error"] == "NotImplementedError"
