"""DHKD (Yang et al., arXiv 2411.08937): the binary-KL logit loss against its formula, the auxiliary head,
and the gradient alignment of a stage (``align_gradients``) against a hand-computed projection."""
from __future__ import annotations

import math

import pytest
import torch

from kdrun.losses import BinaryKLLoss
from kdrun.models.heads import AuxiliaryHead


def test_binary_kl_matches_the_authors_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    d = torch.sigmoid((s - t) / 2).clamp(1e-8, 1 - 1e-8)
    # KLDivLoss(log d, 0.5) + KLDivLoss(log(1 - d), 0.5), summed, times T^2 / N
    want = 4 * (0.5 * (math.log(0.5) - torch.log(d)) + 0.5 * (math.log(0.5) - torch.log(1 - d))).sum() / 5
    torch.testing.assert_close(BinaryKLLoss(temperature=2)(s, t).double(), want, rtol=1e-6, atol=1e-9)
    assert float(BinaryKLLoss()(t, t)) == pytest.approx(0.0, abs=1e-6)  # zero exactly at matching logits


def test_auxiliary_head_shapes():
    head = AuxiliaryHead(16, 10)
    assert [type(m).__name__ for m in head.head] == ["Linear", "Dropout", "BatchNorm1d", "ReLU", "Linear"]
    assert head.head[0].out_features == 200 and head(torch.randn(4, 16)).shape == (4, 10)
    assert isinstance(AuxiliaryHead(16, 10, kind="linear").head, torch.nn.Linear)


def _runner(tmp_path, align):
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    cfg = validate(compose_cfg(["data=synthetic", "data.num_classes=5", "data.batch_size=8", "data.eval_batch_size=8",
                                "data.source.num_train=16", "data.source.num_test=8", "teacher=resnet8", "student=resnet8",
                                "teacher.checkpoint=null", "trainer.device=cpu", "trainer.progress=off", "trainer.tensorboard=false",
                                "stages.main.optimizer.lr=1.0", "stages.main.optimizer.momentum=0", "stages.main.optimizer.weight_decay=0",
                                "adapters.aux_head.dropout=0.0", f"stages.main.align_gradients={align}",
                                "loss.binary_kl.weight=50"], recipe="cifar100_dhkd"))
    trainer = Trainer(cfg, tmp_path)
    trainer.prepare()
    return trainer.stage_runner(0)


def test_align_gradients_projects_the_conflicting_gradient_off_the_reference(tmp_path):
    torch.manual_seed(0)
    runner = _runner(tmp_path, "ce")
    batch = next(iter(runner.ctx.train_loader))
    weights = runner.term_weights(0)
    params = [p for p in runner.groups[0].params if p.requires_grad]
    _, _, weighted = runner.forward(batch, weights)
    flat = {t: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(torch.autograd.grad(weighted[t], params, retain_graph=True, allow_unused=True), params)])
            for t in ("ce", "binary_kl")}
    g_ce, g_kl = flat["ce"], flat["binary_kl"]
    dot = torch.dot(g_kl, g_ce)
    assert dot < 0, "the test needs conflicting gradients (raise loss.binary_kl.weight)"
    want = g_ce + g_kl - dot / torch.dot(g_ce, g_ce) * g_ce
    before = torch.cat([p.detach().flatten().clone() for p in params])
    runner.train_step(batch, weights)
    step = before - torch.cat([p.detach().flatten() for p in params])  # SGD, lr 1, no momentum or decay
    torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-6)
    # the plain sum differs from it (the projection did something)
    assert (step - (g_ce + g_kl)).abs().max() > 1e-4


def test_align_gradients_names_a_term_of_the_stage(tmp_path):
    from kdrun.errors import KdrunError

    with pytest.raises(KdrunError, match="align_gradients: 'kd' is not one of the stage's losses"):
        _runner(tmp_path, "kd")
