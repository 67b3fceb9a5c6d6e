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

import torch

from kdrun.build import fresh_model
from kdrun.errors import KdrunError
from kdrun.experiment import Experiment
from kdrun.plan import model_key

log = logging.getLogger("kdrun")


@torch.no_grad()
def next_round(experiment: Experiment, r: int) -> None:
    """Turn round ``r``'s student into round ``r + 1``'s teacher and restart the student."""
    rounds = experiment.cfg.rounds
    assert rounds is not None
    teacher, student = experiment.models[rounds.teacher], experiment.models[rounds.student]
    try:
        teacher.load_state_dict(student.state_dict())
    except RuntimeError as ex:
        raise KdrunError(f"rounds: {model_key(rounds.student)} cannot become {model_key(rounds.teacher)}: the two models "
                         f"need the same architecture ({str(ex).splitlines()[0]})") from None
    if rounds.reinit_student:
        device = experiment.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(experiment.cfg.seed * 1000 + r + 1)
            fresh = fresh_model(experiment, rounds.student)
        student.load_state_dict(fresh.state_dict())
    log.info("round %d done: %s is now the teacher of round %d%s", r + 1, rounds.student, r + 2,
             "; the student restarts from its initialisation" if rounds.reinit_student else "")
