"""Run by tests/test_distributed.py under torchrun (2 gloo processes on CPU): one training step of a small
model with rmsnorm.RMSNorm under DDP, FSDP2 or tensor + sequence parallelism, compared with the same step
in a single process. Rank 0 writes {"loss": ..., "max_param_err": ...} to the path in argv[2]."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import rmsnorm

D, B, S = 32, 4, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = rmsnorm.RMSNorm(D, eps=1e-6, p=0.5)
        self.w1 = nn.Linear(D, 4 * D)
        self.w2 = nn.Linear(4 * D, D)
        self.out_norm = rmsnorm.RMSNorm(D, bias=True)

    def forward(self, x):
        h = x + self.w2(torch.relu(self.w1(self.norm(x))))
        return self.out_norm(h)


def make():
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, S, D, generator=g), torch.randn(2 * B, S, D, generator=g)


def reference():
    model, (x, target) = make(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def main():
    mode, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_loss, ref_state = reference()
    x, target = data()
    model = make()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
        xs, ts = x.chunk(world)[rank], target.chunk(world)[rank]
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        net = model
        xs, ts = x.chunk(world)[rank], target.chunk(world)[rank]
    elif mode == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            SequenceParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, {
            "norm": SequenceParallel(),
            "w1": ColwiseParallel(input_layouts=Shard(1)),
            "w2": RowwiseParallel(output_layouts=Shard(1)),
            "out_norm": SequenceParallel(),
        })
        net = model
        xs = x.chunk(world, dim=1)[rank]  # the sequence dimension, as SequenceParallel expects
        ts = target.chunk(world, dim=1)[rank]
    else:
        raise SystemExit(f"unknown mode {mode}")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = net(xs)
    if mode == "tp":  # the loss over the whole (sequence-sharded) batch, as a DTensor
        from torch.distributed.tensor import DTensor, Shard

        global_loss = ((out - DTensor.from_local(ts, out.device_mesh, [Shard(1)])) ** 2).mean()
        global_loss.backward()
        loss = global_loss.full_tensor().item()
    else:  # data parallel: each rank's mean, averaged by DDP / FSDP's gradient reduction
        local = ((out - ts) ** 2).mean()
        local.backward()
        t = local.detach().clone()
        dist.all_reduce(t)
        loss = t.item() / world
    opt.step()
    errs = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        errs[k] = (full.detach() - ref_state[k]).abs().max().item()
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"loss": loss, "ref_loss": ref_loss, "max_param_err": max(errs.values()), "errs": errs}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
