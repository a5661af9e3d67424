"""Worker for tests/test_sharded.py: FSDP2 by hand (``fully_shard`` each block, then the root) on a tiny Llama, 2
processes on gloo (CPU). Every scenario runs in one launch; each process records what happened, and process 0
writes OUT/result.json ({scenario: {"0": record, "1": record}}). The single-process references are the same
functions called without a process group (``reference``).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT [SCENARIO ...]
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import leave

import tying

STEPS, LR, ROWS = 3, 0.05, 4
TASKS = ["a", "b"]


def llama(tied: bool = False):
    """A random Llama with GQA (q 32, k/v 16), 3 layers; input and output embeddings tied or not."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def spec(kind: str):
    """tl6 (A tied across layers and q/k/v, B across layers; also on the nf4 base), the same over two tasks (A and B
    shared by them), or tl6 plus lm_head (tied to the input embeddings in the 'tied' scenario)."""
    s = tying.load_spec("tl6", rank=4).model_dump(mode="json")
    if kind == "tasks":
        for f in "AB":
            s["adapter"]["factors"][f]["tie"].append("task")
        s["tasks"] = TASKS
    if kind == "tied":
        s["targets"].append({"select": "lm_head"})
    return tying.load_spec(s)


def batch(rank: int = 0, world: int = 1):
    """This process's rows of the global batch (and their task names)."""
    ids = torch.randint(0, 100, (ROWS, 10), generator=torch.Generator().manual_seed(1))
    names = [TASKS[i % 2] for i in range(ROWS)]
    per = ROWS // world
    return ids[rank * per:(rank + 1) * per], names[rank * per:(rank + 1) * per]


def nf4_llama(folder: Path):
    """The Llama saved in bfloat16 to ``folder`` and loaded 4-bit as QLoRA + FSDP users load it: bitsandbytes nf4
    weights packed in bfloat16 storage (FSDP2 shards them with the other bfloat16 parameters), bfloat16 compute."""
    if not folder.is_dir():
        llama().to(torch.bfloat16).save_pretrained(folder)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16,
                                                             device_map="cpu")


NF4_BASE = {}  # "folder": where this process keeps the bfloat16 Llama that nf4_llama loads


def adapted(kind: str = "tl6", shard: bool = True):
    # train mode: in eval mode on a CPU bitsandbytes repacks 4-bit weights for inference, which fails under FSDP2
    model = llama(tied=kind == "tied") if kind != "nf4" else nf4_llama(NF4_BASE["folder"]).train()
    tying.apply_(model, spec(kind))
    return fully_shard(model) if shard else model


def fully_shard(model, blocks: bool = True, root: bool = True, extra=None):
    from torch.distributed.fsdp import fully_shard as shard

    if blocks:
        for layer in model.model.layers:
            shard(layer)
    if extra is not None:
        shard(extra)
    if root:
        shard(model)
    return model


def forward(model, kind: str, rank: int = 0, world: int = 1):
    ids, names = batch(rank, world)
    if kind != "tasks":
        return model(input_ids=ids, labels=ids)
    with tying.adapters(model, names):
        return model(input_ids=ids, labels=ids)


def train(model, kind: str, rank: int = 0, world: int = 1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        forward(model, kind, rank, world).loss.backward()
        opt.step()
        opt.zero_grad()


def whole(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors, gathered whole (a collective for DTensors)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in tying.bank_of(model).state_dict().items()}


def local(model) -> dict[str, torch.Tensor]:
    """This process's state: every tensor of the model's state_dict, local shards as they are."""
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> float:
    """The largest difference between two dicts of tensors with the same keys (inf where the keys differ)."""
    if sorted(a) != sorted(b):
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel()) if a else 0.0


def reference(kind: str, base: Path | None = None) -> dict[str, torch.Tensor]:
    """The adapter after the same training in one process, without FSDP (``base``: the nf4 base's folder)."""
    NF4_BASE["folder"] = base
    model = adapted(kind, shard=False)
    train(model, kind)
    return whole(model)


def error(fn) -> dict:
    """What ``fn()`` raised: its class and message (an empty dict when it returned)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  any error is what the test reads
        return {"error": type(e).__name__, "message": str(e)}
    return {}


# ---- scenarios: each returns this process's record ------------------------------------------------------------

def train_save_load(out: Path, kind: str) -> dict:
    """Train under FSDP2, save_adapter (collective), then load_adapter into a fresh sharded model."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = adapted(kind)
    train(model, kind, rank, world)
    folder = tying.save_adapter(model, out / kind)
    fresh = adapted(kind)
    tying.load_adapter(fresh, out / kind)
    with torch.no_grad():
        diff = (forward(fresh, kind, rank, world).logits - forward(model, kind, rank, world).logits).abs().max()
    before = local(model)
    merge = error(lambda: tying.merge_(model, task="a" if kind == "tasks" else None))
    q = model.model.layers[0].self_attn.q_proj.base
    record = {"folder": str(folder), "loaded": same(whole(fresh), whole(model)), "forward": diff.item(),
              "sharded": type(tying.bank_of(model)["A"][next(iter(tying.bank_of(model)["A"]))]).__name__,
              "base": [type(q).__name__, type(q.weight).__name__, str(q.weight.dtype)],
              "merge": merge, "merge_unchanged": same(local(model), before)}
    if kind == "nf4":  # last: what bitsandbytes' CPU inference layout does under FSDP2
        fresh.eval()
        with torch.no_grad():
            record["eval"] = error(lambda: forward(fresh, kind, rank, world))
    return record


def dcp(out: Path) -> dict:
    """Full and sharded state dicts through torch.distributed.checkpoint; a DCP folder given to load_adapter."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    model = adapted()
    train(model, "tl6", rank, world)
    want = whole(model)
    tying.save_adapter(model, out / "tl6")  # for the scenarios below
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    record = {"full_keys": sorted(full), "base_keys": [k for k in full if ".base." in k]}
    a = adapted()
    set_model_state_dict(a, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    record["full"] = same(whole(a), want)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / "dcp"))
    b = adapted()
    state = {"model": get_model_state_dict(b)}
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    set_model_state_dict(b, state["model"])
    record["sharded"] = same(whole(b), want)
    with torch.no_grad():
        record["forward"] = (forward(b, "tl6", rank, world).logits - forward(model, "tl6", rank, world).logits
                             ).abs().max().item()
    c = adapted()
    before = local(c)
    record["dcp_as_adapter"] = error(lambda: tying.load_adapter(c, out / "dcp"))
    record["dcp_as_adapter_unchanged"] = same(local(c), before)
    # torch names a frozen parameter by its module path (q_proj.base.weight), which the state dict does not have
    record["ignore_frozen"] = error(lambda: get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True)))
    return record


def placement(out: Path) -> dict:
    """Wraps that break the placement rule, and apply_ / load_adapter after fully_shard: errors, nothing changed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    record = {}
    bank_alone = llama()
    tying.apply_(bank_alone, spec("tl6"))
    record["bank_alone"] = error(lambda: fully_shard(bank_alone, extra=bank_alone.tying_bank))  # torch refuses
    factor_alone = llama()
    tying.apply_(factor_alone, spec("tl6"))
    fully_shard(factor_alone, extra=factor_alone.tying_bank["A"])
    record["factor_alone_forward"] = error(lambda: forward(factor_alone, "tl6", rank, world))
    record["factor_alone_save"] = error(lambda: tying.save_adapter(factor_alone, out / "never"))
    with_block = llama()
    tying.apply_(with_block, spec("tl6"))
    from torch.distributed.fsdp import fully_shard as shard

    for layer in with_block.model.layers[1:]:
        shard(layer)
    fully_shard(with_block, blocks=False, extra=[with_block.model.layers[0], with_block.tying_bank])
    record["with_block_forward"] = error(lambda: forward(with_block, "tl6", rank, world))
    no_root = llama()
    tying.apply_(no_root, spec("tl6"))
    fully_shard(no_root, root=False)
    record["no_root_forward"] = error(lambda: forward(no_root, "tl6", rank, world))
    record["no_root_load"] = error(lambda: tying.load_adapter(no_root, out / "tl6"))
    plain = fully_shard(llama())
    before = local(plain)
    record["apply_after"] = error(lambda: tying.apply_(plain, spec("tl6")))
    record["load_after"] = error(lambda: tying.load_adapter(plain, out / "tl6"))
    record["unchanged"] = same(local(plain), before)
    record["bank_left"] = hasattr(plain, "tying_bank")
    record["never_written"] = (out / "never").exists()
    return record


def bad_input(out: Path) -> dict:
    """A save into a path that is a file, a folder of another spec loaded: every process raises, nothing changes."""
    rank = dist.get_rank()
    model = adapted()
    target = out / "a-file"
    if rank == 0:
        target.write_text("keep me")
    dist.barrier()
    record = {"save_to_file": error(lambda: tying.save_adapter(model, target))}
    record["file_kept"] = target.read_text() == "keep me"
    if rank == 0:  # an adapter of another spec (rank 2), saved from a model of one process
        other = llama()
        tying.apply_(other, tying.load_spec("tl6", rank=2))
        tying.save_adapter(other, out / "rank2")
    dist.barrier()
    before = local(model)
    record["other_spec"] = error(lambda: tying.load_adapter(model, out / "rank2"))
    record["unchanged"] = same(local(model), before)
    return record


SCENARIOS = {"tl6": lambda out: train_save_load(out, "tl6"), "tied": lambda out: train_save_load(out, "tied"),
             "tasks": lambda out: train_save_load(out, "tasks"), "nf4": lambda out: train_save_load(out, "nf4"),
             "dcp": dcp, "placement": placement, "bad_input": bad_input}  # these three in this order


def main(out: str, names: list[str]) -> None:
    import os

    out = Path(out)
    NF4_BASE["folder"] = out / f"nf4-base-{os.environ['RANK']}"
    if "nf4" in names:  # saved before the process group exists: inside one, transformers saves on process 0 only
        llama().to(torch.bfloat16).save_pretrained(NF4_BASE["folder"])
    run_scenarios(SCENARIOS, names, out)


def run_scenarios(scenarios: dict, names: list[str], out: Path) -> None:
    """Run the named scenarios (all by default) in a gloo process group, each process's record (or its crash)
    gathered; process 0 writes them to ``out/result.json``; then leave without interpreter teardown."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in names or list(scenarios):
        try:
            record = scenarios[name](out)
        except Exception:  # noqa: BLE001  recorded, so that the other scenarios still run
            record = {"crash": traceback.format_exc()[-3000:]}
            print(f"process {rank}, scenario {name}:\n{record['crash']}", file=sys.stderr, flush=True)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)
        results[name] = {str(i): r for i, r in enumerate(gathered)}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
