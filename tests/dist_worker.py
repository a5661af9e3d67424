"""Worker for tests/test_distributed.py, launched with torchrun (2 processes, gloo, CPU).

    torchrun --nproc_per_node 2 tests/dist_worker.py {ddp|fsdp2} OUT.safetensors
"""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import tying

SPEC = {"targets": [{"select": "layers.{layer:#}"}], "adapter": {"rank": 4, "factors": {
    "A": {"tie": ["layer"], "init": {"kind": "kaiming_uniform", "seed": 0}},
    "B": {"tie": ["layer"], "init": {"kind": "normal", "std": 0.1, "seed": 1}},
    "u": {"init": "ones"}, "v": {"init": {"kind": "constant", "value": 0.1}}}}}
STEPS, LR, BATCH = 3, 0.5, 8


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 16, generator=g)


def train(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def bank_state(model) -> dict:
    out = {}
    for k, p in tying.bank_of(model).state_dict().items():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[k] = p.detach().clone().contiguous()
    return out


def main(mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = Tower()
    tying.apply_(model, SPEC)
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)  # the root owns the bank
    x, y = data()
    per = BATCH // world
    train(wrapped, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
    state = bank_state(model)
    assert not [k for k in model.state_dict() if ".base." in k], "checkpoints must see the base's own keys"
    if rank == 0:
        save_file(state, out)
    dist.barrier()
    dist.destroy_process_group()
    leave()


def leave() -> None:
    """Exit without interpreter finalization: after FSDP2 on gloo, torch 2.13-2.14 sometimes aborts while tearing down
    (``terminate called without an active exception``, no Python frame) after every step and the file are done;
    about 1 run in 40 on a loaded 2-core machine. The result is written and the group destroyed before this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
