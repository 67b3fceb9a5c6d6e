"""Which device a run trains on."""
from __future__ import annotations

import torch

from kdrun.errors import KdrunError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable device is a clear error. With a
    ``local_rank`` (a DDP process) ``auto``/``cuda`` is that CUDA device."""
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KdrunError(f"trainer.device: unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdrunError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
    return dev


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far, in MiB: the CUDA caching allocator's peak of allocated tensors on a GPU; the
    process's peak resident set size on the CPU (everything the process ever held, not tensors alone)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
