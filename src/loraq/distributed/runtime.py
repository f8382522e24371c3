"""Process-group bookkeeping: who am I, where do I compute, how do ranks agree.

Under ``torchrun`` the environment carries RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init_runtime` then joins the process group (NCCL on CUDA, gloo on CPU)
and pins each rank to its own GPU. Without them it is a single process and
every collective here is the identity.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from loraq.devices import default_device
from loraq.errors import ConfigError, LoraqError

# a checkpoint's per-rank random states (the checkpoint's own rng.safetensors holds rank 0's)
RANK_RNG_FILE = "rng-ranks.safetensors"


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

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's Python object, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return everyone

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

    def seed_rank_streams(self, seed: int) -> None:
        """Give rank r > 0 its own random stream (dropout); rank 0 keeps the one a single process has.

        Call it once the model is initialised: every rank draws the same
        initial adapter weights from ``seed``, then different dropout masks.
        """
        if self.rank:
            torch.manual_seed(random.Random(f"loraq-rank:{seed}:{self.rank}").getrandbits(63))

    def gather_rng_states(self) -> dict[str, torch.Tensor] | None:
        """Every rank's generator states, ``rank<r>/torch_cpu`` (and ``/torch_cuda``), on every rank."""
        if not self.distributed:
            return None
        mine = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return {f"rank{r}/{key}": value.cpu()
                for r, states in enumerate(self.gather(mine)) for key, value in states.items()}

    def restore_rng_state(self, checkpoint_dir: Path) -> None:
        """This rank's generator states from a checkpoint's ``RANK_RNG_FILE`` (if it has one)."""
        path = Path(checkpoint_dir) / RANK_RNG_FILE
        if not self.distributed or not path.is_file():
            return
        from safetensors.torch import load_file

        states = load_file(str(path))
        if f"rank{self.rank}/torch_cpu" in states:
            torch.set_rng_state(states[f"rank{self.rank}/torch_cpu"])
        if self.device.type == "cuda" and f"rank{self.rank}/torch_cuda" in states:
            torch.cuda.set_rng_state(states[f"rank{self.rank}/torch_cuda"], self.device)

    def shutdown(self, wait: bool = False) -> None:
        """Destroy the process group this runtime made; ``wait`` (a run that ended well): first a barrier, so no
        rank tears down its connections while another's collectives are in flight (gloo aborts the process
        then: once seen at exit of FSDP2 runs on a loaded machine). Not after a failure: the others may be gone."""
        if self.initialized_here and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def init_runtime(device: str | torch.device | None = None) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(device=torch.device(device) if device is not None else default_device())
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        if local_rank >= torch.cuda.device_count():
            local_world = os.environ.get("LOCAL_WORLD_SIZE", "?")
            raise ConfigError(f"{local_world} processes on this node but {torch.cuda.device_count()} GPU(s): "
                              "start at most one process per GPU (--nproc / --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    here = False
    if not dist.is_initialized():
        # NCCL is told its device up front (no guessing at the first collective)
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        here = True
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=here)


def check_run_settings(cfg, world_size: int, run_dir: Path | None = None, mode: str | None = None) -> None:
    """Settings that only make sense with several processes, or with the same number as before."""
    if cfg.fsdp and world_size < 2:
        raise ConfigError("--fsdp shards the model across processes and needs several: add --nproc N (N >= 2) "
                          "or start loraq under torchrun")
    if cfg.fsdp and cfg.method == "full":
        raise ConfigError("--fsdp shards the frozen base of --method lora/qlora; --method full trains every weight "
                          "and runs with DDP: drop --fsdp")
    if "nproc" in cfg.explicit and cfg.nproc > 1 and cfg.nproc != world_size and "LOCAL_RANK" in os.environ:
        raise ConfigError(f"--nproc {cfg.nproc}, but torchrun started {world_size} processes: drop --nproc "
                          "when torchrun starts loraq")
    if mode == "resume" and run_dir is not None:
        try:
            saved = json.loads((Path(run_dir) / "run.json").read_text()).get("world_size")
        except (OSError, ValueError, AttributeError):
            saved = None  # rundir's own checks report an unreadable run.json
        if isinstance(saved, int) and saved != world_size:
            raise ConfigError(f"--resume: {run_dir} was trained by {saved} process(es), this run has {world_size}; "
                              f"the global batch (batch-size x grad-accum x processes) must not change: "
                              f"resume with --nproc {saved}")
