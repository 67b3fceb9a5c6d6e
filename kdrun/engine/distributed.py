"""Data-parallel training across processes (torchrun, SLURM): setup, sharding helpers, reductions.

kdrun runs DDP when it finds a multi-process launch in the environment: torchrun's ``WORLD_SIZE`` /
``RANK`` / ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``), or SLURM's ``SLURM_NTASKS`` /
``SLURM_PROCID`` / ``SLURM_LOCALID`` (``srun`` or Hydra's submitit launcher with several tasks per job).
Every rank computes what it would alone on its shard of each global batch; only rank 0 writes.
"""
from __future__ import annotations

import datetime
import inspect
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kdrun import devices
from kdrun.errors import KdrunError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """The device of this process: ``trainer.device`` (see :func:`kdrun.devices.resolve_device`), under
    DDP the CUDA device of the process's local rank."""
    return devices.resolve_device(name, info.local_rank if info is not None and info.enabled else None)


def _slurm_env() -> dict[str, str]:
    """torchrun-style variables from SLURM's, when SLURM started several tasks."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return {}
    env = {"WORLD_SIZE": os.environ["SLURM_NTASKS"], "RANK": os.environ["SLURM_PROCID"],
           "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]
        env["MASTER_ADDR"] = first
    if "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    return env


def launched_info() -> DistInfo:
    """The rank layout this process was launched with (world size 1 when not launched for DDP)."""
    env = {**os.environ, **_slurm_env()}
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")), world_size=world)


DEFAULT_TIMEOUT_S = 600  # trainer.dist_timeout_s: how long a rank waits for the others in one collective


def init(device_setting: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group if this is a multi-process launch (idempotent); return the layout.

    ``timeout_s``: a collective that waits longer for a rank (hung, or dead without the launcher
    noticing) fails with an error on the waiting ranks instead of blocking them for PyTorch's default
    30 minutes."""
    info = launched_info()
    if not info.enabled:
        return info
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), info.local_rank, dist.get_world_size())
    os.environ.update(_slurm_env())
    use_cuda = torch.cuda.is_available() and device_setting in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    extra = {}
    if use_cuda and "device_id" in inspect.signature(dist.init_process_group).parameters:
        extra["device_id"] = torch.device("cuda", info.local_rank)  # binds the NCCL communicator to this rank's GPU
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=float(timeout_s)), **extra)
    return info


def timeout_message(ex: BaseException, info: DistInfo, timeout_s: float) -> str | None:
    """One line for a collective that timed out on this rank (None for any other error)."""
    text = str(ex)
    if not info.enabled or not any(w in text for w in ("Timed out", "timed out", "Timeout", "timeout")):
        return None
    return (f"rank {info.rank} of {info.world_size}: a collective operation waited more than {timeout_s:g} s for the other "
            f"ranks: one of them is hung or died (see its log). trainer.dist_timeout_s sets this limit.")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op alone)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks in place (a no-op alone)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams under data parallelism: distinct per rank, derived
    from ``(seed, rank)`` by NumPy's ``SeedSequence`` (so nearby seeds and ranks give unrelated streams)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] % (2**63))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def check_batch(batch_size: int, info: DistInfo) -> int:
    """Per-rank batch size of a global ``batch_size``."""
    if batch_size % info.world_size:
        raise KdrunError(f"data.batch_size={batch_size} is the global batch and must be divisible by the "
                         f"{info.world_size} processes")
    return batch_size // info.world_size
