"""Self-distillation over rounds (born-again networks).

Furlanello et al., "Born-Again Neural Networks", ICML 2018: a student of the teacher's architecture
is trained from the teacher; it then becomes the teacher of the next generation, and so on. Borup &
Andersen, "Even your Teacher Needs Guidance", NeurIPS 2021, show that every step should keep a
weight alpha_r on the ground truth next to 1 - alpha_r on the teacher's targets (with alpha = 0 the
repeated distillation over-regularises); ``rounds.weights`` sets such a weight per round and term.

A run with ``rounds.count = R`` runs all its stages R times. After round r:

1. ``<student>_round<r>.pt`` is exported and the round's accuracies are recorded;
2. the ``teacher`` model takes the student's weights (state dict copy, buffers included);
3. the student restarts from its initialisation (``reinit_student``; re-built with a per-round seed,
   its ``checkpoint`` and ``init_from`` applied again); adapters and loss-term state carry over.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kdrun.build import Pipeline

log = logging.getLogger("kdrun")


def round_weight(rounds: Any, term: str, r: int, base: float) -> float:
    """The weight of loss term ``term`` in round ``r`` (0-based): ``rounds.weights[term][r]`` when
    given, else the term's own ``weight`` (``base``)."""
    value = (rounds.get("weights") or {}).get(term) if rounds is not None else None
    return float(value[r]) if value is not None else float(base)


def round_weights(cfg: Any, r: int) -> dict[str, float]:
    """Every term's weight in round ``r`` (terms without a per-round list keep their weight)."""
    return {str(t): round_weight(cfg.get("rounds"), str(t), r, float(c.get("weight", 1.0)))
            for t, c in (cfg.get("loss") or {}).items()}


@torch.no_grad()
def next_round(pipe: Pipeline, r: int) -> None:
    """Turn round ``r``'s student into round ``r + 1``'s teacher and restart the student."""
    rounds = pipe.cfg.rounds
    teacher, student = pipe.models[rounds.teacher], pipe.models[rounds.student]
    try:
        teacher.load_state_dict(student.state_dict())
    except RuntimeError as ex:
        from kdrun.errors import KdrunError

        from kdrun.config import model_key

        raise KdrunError(f"rounds: {model_key(rounds.student)} cannot become {model_key(rounds.teacher)}: the two models "
                         f"need the same architecture ({str(ex).splitlines()[0]})") from None
    if rounds.reinit_student:
        with torch.random.fork_rng(devices=[pipe.device] if pipe.device.type == "cuda" else []):
            torch.manual_seed(int(pipe.cfg.seed) * 1000 + r + 1)
            fresh = pipe.fresh_model(rounds.student)
        student.load_state_dict(fresh.state_dict())
    log.info("round %d done: %s is now the teacher of round %d%s", r + 1, rounds.student, r + 2,
             "; the student restarts from its initialisation" if rounds.reinit_student else "")
