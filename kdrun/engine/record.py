"""Where a run stands and what it measured (saved in every checkpoint), and the key of a stage run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunKey:
    """One run of one stage: the self-distillation round (0-based) and the stage's name.

    ``label`` is how results are keyed in summary.json and TensorBoard: the stage's name, or
    ``round<r>/<stage>`` (1-based) in a run with rounds."""

    round: int
    stage: str
    with_rounds: bool = False

    @property
    def label(self) -> str:
        return f"round{self.round + 1}/{self.stage}" if self.with_rounds else self.stage

    def of(self, name: str) -> str:
        """``name`` (a model) qualified by this key's round in a run with rounds: ``round2/teacher``."""
        return f"round{self.round + 1}/{name}" if self.with_rounds else name


@dataclass
class RunRecord:
    """Where a run stands and what it measured; saved in every checkpoint.

    Position: ``round`` (rounds completed), ``stage_index`` (the stage in progress), ``epoch`` (its
    epochs completed), ``batch`` (micro-batches of the current epoch already consumed: a mid-epoch
    checkpoint resumes at the next one), ``stage_step`` (optimizer steps in the stage) and ``step``
    (optimizer steps over the whole run)."""

    stage_index: int = 0
    epoch: int = 0
    batch: int = 0
    stage_step: int = 0
    step: int = 0
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # by RunKey.label
    frozen_top1: dict[str, float] = field(default_factory=dict)  # by RunKey.of(model)
    frozen_ppl: dict[str, float] = field(default_factory=dict)  # language models: test perplexity, by RunKey.of(model)
    train_time_s: float = 0.0
    round: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: accuracies, exported student
    probe: dict[str, Any] = field(default_factory=dict)  # the last linear probe's result
    metrics_rows: int | None = None  # rows of metrics.jsonl when the checkpoint was written (resume drops later ones)

    def start_stage(self, index: int) -> None:
        """Move to the start of stage ``index``."""
        self.stage_index, self.epoch, self.batch, self.stage_step = index, 0, 0, 0
