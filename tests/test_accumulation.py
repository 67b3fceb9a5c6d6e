"""Gradient accumulation keeps means global: K micro-batches of B/K train the same weights as one batch
of B (float64, tolerance 1e-10), also when the micro-batches hold different numbers of valid tokens,
and also over 2 DDP ranks. A mean of micro-batch means (what token terms would give if the engine
treated them as sample means) does not."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kdrun.config import validate
from kdrun.engine import run
from kdrun.engine.trainer import Trainer
from kdrun.losses.tokens import TokenCrossEntropy, TokenKLLoss
from tests.conftest import REPO, compose_cfg

# a frozen random float64 teacher distilled into a float64 student: token CE + token KL, plain SGD
# with momentum (no schedule, no weight decay), 3 optimizer steps
COMMON = ["~stages.teacher", "teacher.dtype=float64", "student.dtype=float64", "teacher.allow_random=true",
          "optim@stages.distill.optimizer=sgd", "stages.distill.optimizer.lr=0.5", "stages.distill.optimizer.weight_decay=0",
          "stages.distill.scheduler=null", "stages.distill.max_steps=3", "trainer.eval_every_steps=null",
          "trainer.progress=off", "trainer.tensorboard=false", "trainer.save_checkpoints=false", "trainer.device=cpu",
          "trainer.deterministic=true"]
ONE_BATCH = ["data.batch_size=64", "trainer.accumulate_grad_batches=1"]
FOUR_MICRO = ["data.batch_size=16", "trainer.accumulate_grad_batches=4"]


def student(run_dir):
    return torch.load(run_dir / "student.pt", weights_only=True)["model"]


def train(tmp_path, name, extra):
    cfg = validate(compose_cfg(COMMON + extra, recipe="synthetic_tokens_kd"))
    summary = run(cfg, tmp_path / name)
    assert summary["steps"] == 3
    return student(tmp_path / name)


def max_difference(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_four_micro_batches_train_the_weights_of_one_batch(tmp_path):
    one = train(tmp_path, "one", ONE_BATCH)
    four = train(tmp_path, "four", FOUR_MICRO)
    assert all(v.dtype == torch.float64 for v in one.values())
    assert max_difference(one, four) < 1e-10
    # the micro-batches of the first step hold different numbers of valid tokens
    trainer = Trainer(validate(compose_cfg(COMMON + FOUR_MICRO, recipe="synthetic_tokens_kd")), tmp_path / "probe")
    trainer.prepare()
    loader = trainer.ctx.train_loader
    loader.set_epoch(trainer.stage_runner(0).epoch_key(0))
    counts = [int(b["loss_mask"].sum()) for b, _ in zip(loader, range(4))]
    assert len(set(counts)) > 1, counts


def test_a_mean_of_micro_batch_means_trains_other_weights(tmp_path, monkeypatch):
    one = train(tmp_path, "one", ONE_BATCH)
    for cls in (TokenCrossEntropy, TokenKLLoss):  # treat the token means as sample means
        monkeypatch.setattr(cls, "mean_over", "samples")
    naive = train(tmp_path, "naive", FOUR_MICRO)
    assert max_difference(one, naive) > 1e-6


@pytest.mark.slow
def test_two_ranks_with_four_micro_batches_train_the_weights_of_one_batch(tmp_path):
    one = train(tmp_path, "one", ONE_BATCH)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun",
                           "+recipe=synthetic_tokens_kd", *COMMON, *FOUR_MICRO, f"hydra.run.dir={two}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert max_difference(one, student(two)) < 1e-10


def test_token_means_count_the_tokens_of_the_transformed_batches(tmp_path):
    """A transform that changes the scored tokens (a rollout does): the micro-batches are weighted by the tokens
    the terms see, not by the data's, so four micro-batches still train the weights of one batch."""
    extra = ["+batch_transform={_target_: tests.helpers.ShortenMask}"]
    one = train(tmp_path, "one", ONE_BATCH + extra)
    four = train(tmp_path, "four", FOUR_MICRO + extra)
    assert max_difference(one, four) < 1e-10
