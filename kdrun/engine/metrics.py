"""Where metrics go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard, rank 0 only."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, at any depth, so that the
    JSON files stay standard JSON (e.g. a few-shot group with no test classes has no accuracy)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsWriter:
    """Append records to ``<run_dir>/metrics.jsonl`` and scalars to TensorBoard (``<run_dir>/tb``)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict[str, Any], step: int, tb_prefix: str = "") -> None:
        self.file.write(json.dumps(json_safe(record)) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{tb_prefix}{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class NullWriter:
    """The writer of ranks other than 0: they write nothing."""

    def write(self, record: dict[str, Any], step: int, tb_prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass
