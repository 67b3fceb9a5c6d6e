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

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_rows: int | None = None,
                 resume_step: int | None = None) -> None:
        """``resume_rows``/``resume_step``: a resumed run's checkpoint position. Rows written after that
        checkpoint (by the interrupted process) are dropped, so that re-run steps are not logged twice;
        TensorBoard purges its events after ``resume_step``."""
        self.path = Path(run_dir) / "metrics.jsonl"
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True) if self.path.is_file() else []
        if resume_rows is not None and len(lines) > resume_rows:
            lines = lines[:resume_rows]
            self.path.write_text("".join(lines), encoding="utf-8")
        self.rows = len(lines)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)

    def write(self, record: dict[str, Any], step: int, tb_prefix: str = "") -> None:
        self.file.write(json.dumps(json_safe(record)) + "\n")
        self.file.flush()
        self.rows += 1
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

    rows = None

    def write(self, record: dict[str, Any], step: int, tb_prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass
