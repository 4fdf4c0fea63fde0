"""Data-parallel search across processes (``torchrun``): gloo on CPU, NCCL on GPU.

Every rank runs the same seeded program. Each training batch is cut into a fixed number of
shards (``TrainConfig.shards``); each rank computes the gradients of its shards, each shard's loss
being its share of the *global* batch mean, and every rank sums all shards' gradients in shard
order. With the same shard count, a single process computes the very same sums, so the same
seed gives bit-identical training, and the same policy, with 1 or N processes (given the same
number of torch threads per process, since thread count changes kernels' summation order). Shapley coalitions are split across ranks and their
values gathered, so every rank sees every value. Only rank 0 writes files.

With one process (no ``torchrun``) every function here is a no-op, and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous run of ``items`` (runs differ in length by at most one)."""
        return np.array_split(items, self.world)[self.rank]

    def shard_ids(self, n_shards: int) -> range:
        """The shards of a batch this rank computes: every world-th, starting at its rank."""
        return range(self.rank, n_shards, self.world)

    def sum_shards(self, local: list[torch.Tensor], n_shards: int) -> torch.Tensor:
        """Sum per-shard flat gradients over all ranks, always in shard order.

        A fixed summation order makes the result bit-identical however many ranks computed the
        shards, which an all-reduce (whose order depends on the world size) would not.
        """
        if not self.active:
            return _ordered_sum(local)
        per_rank = -(-n_shards // self.world)
        stacked = torch.zeros(per_rank, local[0].numel() if local else 0, dtype=torch.float32, device=self.device)
        for i, flat in enumerate(local):
            stacked[i] = flat
        gathered = [torch.zeros_like(stacked) for _ in range(self.world)]
        dist.all_gather(gathered, stacked)
        return _ordered_sum([gathered[s % self.world][s // self.world] for s in range(n_shards)])

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def min(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MIN)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def _reduce(self, value: float, op) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return float(tensor[0])

    def gather_values(self, local: np.ndarray, total: int) -> np.ndarray:
        """The values every rank computed for its ``share`` of ``total`` items, in item order."""
        if not self.active:
            return local
        counts = [len(run) for run in np.array_split(np.arange(total), self.world)]
        padded = np.zeros(max(counts))
        padded[:len(local)] = local
        gathered = [torch.zeros(len(padded), dtype=torch.float64, device=self.device) for _ in range(self.world)]
        dist.all_gather(gathered, torch.from_numpy(padded).to(self.device))
        return np.concatenate([values.cpu().numpy()[:count] for values, count in zip(gathered, counts)])

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if not self.active:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def _ordered_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


SINGLE_PROCESS = Context()


def init_from_environment(device: str = "cpu") -> Context:
    """A context from torchrun's environment (RANK, WORLD_SIZE), or a single-process one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # Rank 0 alone trains the float model while the others wait: allow for it in the timeout.
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=timedelta(hours=4))
    return Context(rank=rank, world=world, device=torch_device)


def shutdown(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()
