"""Loading model weights named by ``<model>.checkpoint``: local files or URLs, safely."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")


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


def load_weights(model: nn.Module, location: str, key: str, strict: bool = True, hint: str = "") -> None:
    """Load weights into ``model`` from ``location`` (``key`` names the config key in messages)."""
    path = fetch(location, key)
    if not path.is_file():
        raise KdrunError(f"{key}: checkpoint not found: {path}. {hint}".strip())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as ex:
        raise KdrunError(f"{key}: cannot read {path} as a weights-only checkpoint: {str(ex).splitlines()[0]}") from None
    state = extract_state_dict(obj, str(path))
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as ex:
        lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
        raise KdrunError(f"{key}: {path} does not fit {type(model).__name__}: {' '.join(lines[1:3])[:400]} "
                         f"(is {key.split('.')[0]}=<model> the architecture it was trained as?)") from None
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning("%s: loaded non-strictly; missing %d keys, unexpected %d keys", key,
                    len(result.missing_keys), len(result.unexpected_keys))
