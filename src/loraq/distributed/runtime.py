"""Process-group bookkeeping: who am I, where do I compute, how do ranks agree.

Under ``torchrun`` the environment carries RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init_runtime` then joins the process group (NCCL on CUDA, gloo on CPU)
and pins each rank to its own GPU. Without them it is a single process and
every collective here is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from loraq.devices import default_device
from loraq.errors import LoraqError


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum a Python number over ranks."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def max(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's Python object, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and hand its result -- or its LoraqError -- to every rank.

        Without this, a user mistake found by rank 0 would leave the other
        ranks waiting forever at the next collective.
        """
        if not self.distributed:
            return fn()
        result: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                result = ("ok", fn())
            except LoraqError as exc:
                result = ("error", str(exc))
        kind, value = self.broadcast(result)
        if kind == "error":
            raise LoraqError(value)
        return value

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_runtime(device: str | torch.device | None = None) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(device=torch.device(device) if device is not None else default_device())
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        here = True
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=here)
