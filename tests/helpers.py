"""Importable test components (``_target_: tests.helpers.X``): models with structured outputs, a
transform that adds a batch field, and a transform that kills its own process (for resume tests)."""
from __future__ import annotations

import os
import signal

import torch
from torch import Tensor, nn

from kdrun.data.mix import BatchTransform
from kdrun.models.simple import simple_cnn


class AddFlipped(BatchTransform):
    """A batch transform that adds ``batch.flipped``: the input mirrored left-right (on evaluation
    batches too)."""

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**batch, "flipped": batch["input"].flip(-1)}

    def for_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self(batch)


class KillAtCall(BatchTransform):
    """A batch transform that SIGKILLs its process on its ``at``-th call (the build-time trace is call 1,
    training micro-batch k is call k + 1): a crash at a known moment. Otherwise it applies ``inner``
    (another transform, e.g. mixup), or nothing."""

    def __init__(self, at: int, inner: BatchTransform | None = None) -> None:
        self.at, self.calls, self.inner = int(at), 0, inner

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(batch) if self.inner is not None else batch


class DictOutputCNN(nn.Module):
    """A small CNN returning ``{"logits": ..., "pooled": ...}`` (like a Hugging Face ModelOutput)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.net = simple_cnn(num_classes=num_classes, in_channels=in_channels, width=8, depth=2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        pooled = self.net.flatten(self.net.pool(self.net.blocks(x)))
        return {"logits": self.net.fc(pooled), "pooled": pooled, "unused": None}


class TupleOutputCNN(DictOutputCNN):
    """The same network returning ``(logits, pooled)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out = super().forward(x)
        return out["logits"], out["pooled"]


class KeywordCNN(DictOutputCNN):
    """A network whose forward reads two keyword arguments: ``image`` and ``scale`` (B,)."""

    def forward(self, image: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(image * scale.view(-1, 1, 1, 1).to(image.dtype))["logits"]


class AddScale(AddFlipped):
    """Adds ``batch.scale``, a per-sample factor of 1 (for KeywordCNN), to training and evaluation batches."""

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**batch, "scale": torch.ones(batch["input"].shape[0], device=batch["input"].device)}


class TrainOnlyField:
    """A plain transform adding ``batch.extra`` to training batches only (evaluation batches lack it)."""

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**batch, "extra": batch["input"]}


class HangOnRank(BatchTransform):
    """A batch transform that sleeps ``seconds`` on rank ``rank`` at its ``at``-th call: a hung DDP rank."""

    def __init__(self, at: int, rank: int = 1, seconds: float = 60.0) -> None:
        self.at, self.rank, self.seconds, self.calls = int(at), int(rank), float(seconds), 0

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        import time

        self.calls += 1
        if self.calls == self.at and int(os.environ.get("RANK", "0")) == self.rank:
            time.sleep(self.seconds)
        return batch


class RefusedUnderDeterminism(nn.Module):
    """A loss term whose forward fails as torch does for an op without a deterministic implementation
    (CUDA's adaptive pooling backward under ``torch.use_deterministic_algorithms(True)``)."""

    def forward(self, student: Tensor) -> Tensor:
        if not student.requires_grad:  # the build-time shape trace runs without autograd
            return student.sum() * 0
        raise RuntimeError("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but you set "
                           "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
                           "operation, or you can use the 'warn_only=True' option, if that's acceptable for your application.")


class MixupThenSignal(BatchTransform):
    """Mixup (drawing from the global generators, as a user's transform would) that sends this process
    SIGTERM at its ``at``-th call: a preemption at a known point of a run."""

    def __init__(self, num_classes: int, at: int) -> None:
        from kdrun.data.mix import Mixup

        self.mix, self.at, self.calls = Mixup(num_classes), int(at), 0

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        import signal

        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.mix(batch)


class ShortenMask(BatchTransform):
    """A batch transform that keeps only the first ``1 + input_ids[:, 0] % width`` positions of ``batch.loss_mask``
    of every row: a per-row function of the row, so one batch and its micro-batches see the same masks, but the
    transformed token counts differ from the data's (as after a rollout)."""

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask = batch["loss_mask"]
        keep = 1 + batch["input_ids"][:, :1] % mask.shape[1]
        cols = torch.arange(mask.shape[1], device=mask.device).view(1, -1)
        return {**batch, "loss_mask": mask & (cols < keep)}


def method_overrides(recipe: str) -> list[str]:
    """``recipe`` on its tiny stand-ins (tests.test_recipes.smoke_overrides), made comparable across process counts:
    2 steps of plain SGD (lr 5, no schedule) per stage, fp32, deterministic, and the per-rank randomness that one
    process draws otherwise turned off: dropout, Swing's target noise (each rank noises its own micro-batch), the
    router's load-balancing loss (a statistic of each rank's tokens, as Hugging Face computes it)."""
    from tests.conftest import compose_cfg
    from tests.test_recipes import smoke_overrides

    base = [o for o in smoke_overrides(recipe) if not o.startswith("trainer.max_")]
    stages = list(compose_cfg(base, recipe=recipe).stages)
    out = [*base, "trainer.deterministic=true", "trainer.max_epochs=1", "trainer.max_steps_per_epoch=2",
           "trainer.eval_every_steps=null", "trainer.precision=fp32",
           *[o for s in stages for o in (f"optim@stages.{s}.optimizer=sgd", f"stages.{s}.optimizer.lr=5.0",
                                         f"stages.{s}.scheduler=null")]]
    out += ["teacher.net.dtype=float32"] if "teacher.net.path=null" in base else []
    out += {"text_swing": ["loss.swing.noise=0.0"], "llava_mod_text": ["loss.router.weight=0.0"]}.get(recipe, [])
    if any("model_type: bert" in o for o in base):
        out += ["+student.net.config.hidden_dropout_prob=0.0", "+student.net.config.attention_probs_dropout_prob=0.0"]
    return out


def initial_weights(recipe: str, overrides: list[str], name: str) -> dict[str, Tensor]:
    """``name``'s weights as the run builds them (seeded as the trainer seeds), before any step."""
    from kdrun.build import build
    from kdrun.config import validate
    from kdrun.engine.trainer import seed_everything
    from kdrun.schema import experiment_config
    from tests.conftest import compose_cfg

    cfg = experiment_config(validate(compose_cfg(overrides, recipe=recipe)))
    seed_everything(cfg.seed, True)
    return {k: v.detach().clone() for k, v in build(cfg, torch.device("cpu")).models[name].state_dict().items()}
