"""Loading model weights named by ``<model>.checkpoint``: local files or URLs, safely."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from kdrun.engine.checkpoint import read_tensors_file
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")
MOSTLY_LOADED = 0.5  # a non-strict load that fills fewer of the model's tensors leaves a random model


def _cache_dir() -> Path:
    return Path(os.environ.get("KDRUN_CACHE", Path.home() / ".cache" / "kdrun")) / "checkpoints"


def fetch(location: str, key: str) -> Path:
    """A local path for ``location``: the path itself, or the cached download of a URL."""
    if urlparse(str(location)).scheme in ("http", "https"):
        target = _cache_dir() / Path(urlparse(location).path).name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s -> %s", location, target)
            try:
                torch.hub.download_url_to_file(location, str(target), progress=False)
            except Exception as ex:  # network errors of every kind
                raise KdrunError(f"{key}: cannot download {location}: {ex}") from None
        return target
    return Path(location).expanduser()


def extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``{'model': sd}`` (kdrun exports, RepDistiller),
    ``{'state_dict': sd}``, or a bare state dict. A ``module.`` prefix (DataParallel) is removed."""
    if isinstance(obj, dict):
        for k in ("model", "state_dict", "net"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KdrunError(f"{source}: no state dict found (expected {{'model': state_dict}} or a state dict)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, location: str, key: str, strict: bool = True, hint: str = "") -> float:
    """Load weights into ``model`` from ``location`` (``key`` names the config key in messages); return
    the fraction of the model's tensors the file filled (1.0 for a strict load)."""
    path = fetch(location, key)
    if not path.is_file():
        raise KdrunError(f"{key}: checkpoint not found: {path}. {hint}".strip())
    obj = read_tensors_file(path, key)
    state = extract_state_dict(obj, str(path))
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as ex:
        lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
        raise KdrunError(f"{key}: {path} does not fit {type(model).__name__}: {' '.join(lines[1:3])[:400]} "
                         f"(is {key.split('.')[0]}=<model> the architecture it was trained as?)") from None
    total = len(model.state_dict())
    filled = 1.0 if not total else (total - len(result.missing_keys)) / total
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning("%s: loaded non-strictly; missing %d keys, unexpected %d keys", key,
                    len(result.missing_keys), len(result.unexpected_keys))
    if filled < MOSTLY_LOADED:
        log.warning("%s: %s filled only %d of %d tensors of %s: the model counts as randomly initialised (listed in "
                    "random_models); is it the checkpoint of this architecture?", key, path,
                    total - len(result.missing_keys), total, type(model).__name__)
    return filled
