"""Worker for tests/test_sharded.py's tensor parallelism: a tiny Llama split by transformers' ``tp_plan="auto"`` or by
torch's ``parallelize_module`` (q/k/v/gate/up colwise, o/down rowwise) on a 2-process gloo mesh, the adapter applied
after the split. Process 0 writes OUT/result.json ({scenario: {"0": record, "1": record}}); the single-process
references are the same functions without a split (``reference``).

    torchrun --nproc_per_node 2 tests/tp_worker.py OUT [SCENARIO ...]
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import ROWS, error, llama, local, run_scenarios, same

import tying

STEPS, LR = 3, 0.05


def spec(kind: str, **adapter):
    """tl6 on q/k/v (A tied across layers and q/k/v: whole under colwise; B tied across the layers of each projection:
    rows), 'all': every linear layer, A and B tied across the layers of each projection (o/down rowwise: A columns,
    B whole), u and v per module; 'qkvo': A tied across q/k/v and o_proj (o_proj rowwise: refused)."""
    if kind == "tl6":
        return tying.load_spec("tl6", rank=4, **adapter)
    one = {"tie": ["layer"], "init": {"kind": "kaiming_uniform", "seed": 0}}
    factors = {"A": one, "B": {**one, "init": {"kind": "normal", "std": 0.1, "seed": 1}},
               "u": {"tie": [], "init": "ones"}, "v": {"tie": [], "init": {"kind": "constant", "value": 0.5}}}
    if kind == "all":
        targets = [{"select": "**.{layer:#}.self_attn.{proj:q_proj|k_proj|v_proj|o_proj}"},
                   {"select": "**.{layer:#}.mlp.{proj:gate_proj|up_proj|down_proj}"}]
    else:
        targets = [{"select": "**.{layer:#}.self_attn.{proj:q_proj|k_proj|v_proj|o_proj}"}]
        factors["A"] = {**one, "tie": ["layer", "proj"]}
    return tying.load_spec({"targets": targets, "adapter": {"rank": 4, "factors": factors, **adapter}})


def batch():
    return torch.randint(0, 100, (ROWS, 10), generator=torch.Generator().manual_seed(1))


def split_by_hand(model):
    """torch's parallelize_module: q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel, on a mesh of every process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {}
    for i in range(len(model.model.layers)):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{m}"] = ColwiseParallel()
        for m in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{m}"] = RowwiseParallel()
    return parallelize_module(model, init_device_mesh("cpu", (dist.get_world_size(),)), plan)


def base(how: str, folder: Path | None = None):
    """The Llama split by transformers' tp_plan ('hf', from ``folder``), by hand ('torch'), or not split (None)."""
    if how == "hf":
        return transformers.AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto")
    return split_by_hand(llama()) if how == "torch" else llama()


def train(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    ids = batch()
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def whole(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in tying.bank_of(model).state_dict().items()}


def reference(kind: str) -> dict[str, torch.Tensor]:
    """The adapter after the same training on the model not split, in one process."""
    model = llama()
    tying.apply_(model, spec(kind))
    train(model)
    return whole(model)


def train_save_load(out: Path, how: str, kind: str) -> dict:
    """Split, apply_, train, save_adapter (collective); load_adapter into a fresh split model and into one not split."""
    model = base(how, out / f"base-{dist.get_rank()}")
    tying.apply_(model, spec(kind))
    placements = {f"{f}.{k}": str(p.placements) for f, d in tying.bank_of(model).items() for k, p in d.items()}
    train(model)
    folder = tying.save_adapter(model, out / f"{how}-{kind}")
    fresh = base(how, out / f"base-{dist.get_rank()}")
    tying.load_adapter(fresh, folder)
    plain = llama()
    tying.load_adapter(plain, folder)
    with torch.no_grad():
        logits = model(input_ids=batch()).logits
        record = {"folder": str(folder), "placements": placements, "loaded": same(whole(fresh), whole(model)),
                  "fresh": (fresh(input_ids=batch()).logits - logits).abs().max().item(),
                  "plain": (plain(input_ids=batch()).logits - logits).abs().max().item()}
    before = local(model)
    record["merge"] = error(lambda: tying.merge_(model))
    record["merge_unchanged"] = same(local(model), before)
    return record


def refusals(out: Path) -> dict:
    """Adapters that cannot follow the split: refused by apply_, the model unchanged; the split after apply_."""
    record = {}
    model = base("torch")
    before = local(model)
    record["qkvo"] = error(lambda: tying.apply_(model, spec("qkvo")))
    record["dropout"] = error(lambda: tying.apply_(model, spec("tl6", dropout=0.1)))
    record["ia3"] = error(lambda: tying.apply_(model, tying.load_spec("ia3")))
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    gate = model.model.layers[0].mlp.gate_proj  # as transformers' packed_colwise cuts a fused gate_up weight
    whole = gate.weight.full_tensor().detach()
    packed = distribute_tensor(whole, gate.weight.device_mesh, [_StridedShard(0, split_factor=2)])
    gate.weight = torch.nn.Parameter(packed, requires_grad=False)
    before = local(model)
    record["packed"] = error(lambda: tying.apply_(model, spec("all")))
    record["unchanged"] = same(local(model), before)
    record["bank_left"] = hasattr(model, "tying_bank")
    adapted = llama()
    tying.apply_(adapted, spec("tl6"))
    record["split_after_apply"] = error(lambda: split_by_hand(adapted))
    return record


SCENARIOS = {"hf_tl6": lambda out: train_save_load(out, "hf", "tl6"),
             "torch_all": lambda out: train_save_load(out, "torch", "all"), "refusals": refusals}


def main(out: str, names: list[str]) -> None:
    out = Path(out)
    rank = os.environ["RANK"]
    llama().save_pretrained(out / f"base-{rank}")  # before the process group: inside one, only process 0 saves
    run_scenarios(SCENARIOS, names, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
