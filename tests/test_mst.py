"""MST-Distill (Li et al., ACM MM 2025): the mask networks, the routed mixture-of-teachers loss against the
authors' expressions, the two-view digits, and the three-stage recipe's hand-overs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdrun.losses import MixtureOfTeachersKD
from kdrun.models.masking import FeatureMask, with_feature_mask
from kdrun.models.simple import mlp, two_view_mlp


def test_a_feature_mask_multiplies_the_layer_output_and_freezes_the_model():
    torch.manual_seed(0)
    base = two_view_mlp(num_classes=5)
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    net = with_feature_mask(base, "fc1")
    assert all(not p.requires_grad for n, p in net.named_parameters() if not n.startswith("feature_mask."))
    assert all(p.requires_grad for p in net.feature_mask.parameters())
    assert set(plain) < set(net.state_dict())  # the model's own names are kept
    x, x2 = torch.randn(3, 32), torch.randn(3, 32)
    h = net.fc1(torch.cat([x, x2], 1))  # (the hook runs here too: h is already masked)
    raw = F.linear(torch.cat([x, x2], 1), plain["fc1.weight"], plain["fc1.bias"])
    m = net.feature_mask(raw)
    assert m.shape == (3, 128) and float(m.min()) > 0 and float(m.max()) < 1
    torch.testing.assert_close(h, raw * m)
    want = net.head(net.act2(net.fc2(net.act1(raw * m))))
    torch.testing.assert_close(net(x, x2), want)


def test_the_mask_network_has_the_codes_shape():
    mask = FeatureMask(64, heads=3)
    assert mask.width == 64 // 6 * 3 and mask.embed.out_features == 64 * mask.width
    with pytest.raises(ValueError, match="no module 'fc9'"):
        with_feature_mask(mlp(), "fc9")


def _teachers(b=6, c=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, requires_grad=True), [torch.randn(b, c, generator=g) for _ in range(k)]


def test_routed_kd_and_load_balancing_follow_the_authors_expressions():
    torch.manual_seed(0)
    term = MixtureOfTeachersKD(num_classes=5, num_teachers=4, k=1, temperature=4)
    s, teachers = _teachers()
    out = term(s, teachers)
    g = term.routing(s)
    top = g.argmax(1)
    kd = 0.0
    for i in range(6):  # the code's distillation_loss on each sample's top-1 teacher: KL(batchmean) * T^2
        kd += 16 * float(F.kl_div(F.log_softmax(s[i:i + 1] / 4, 1), F.softmax(teachers[int(top[i])][i:i + 1] / 4, 1),
                                  reduction="batchmean"))
    assert float(out["kd"]) == pytest.approx(kd / 6, rel=1e-5)
    mean_g = g.mean(0)
    lb = nn.KLDivLoss(reduction="batchmean")(torch.log(mean_g), torch.ones(4) / 4)  # the code's load_balancing_loss
    assert float(out["balance"]) == pytest.approx(float(lb), rel=1e-5)


def test_the_gate_learns_from_load_balancing_only():
    term = MixtureOfTeachersKD(num_classes=5, num_teachers=4)
    s, teachers = _teachers()
    term(s, teachers)["kd"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in term.gate.parameters())
    assert s.grad is not None  # the student learns from the chosen teacher
    term.zero_grad()
    term(s, teachers)["balance"].backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in term.gate.parameters())


def test_the_weights_decay_by_epoch_as_the_code():
    term = MixtureOfTeachersKD(num_classes=5, num_teachers=4, kd_weight=1.0, balance_weight=1.0)
    got = {}
    for e in (0, 1, 10, 11, 30, 31):
        term.on_epoch_start(e, 100)
        got[e] = term.weights()
    w_kl, w_lb = 1.0, 1.0  # the code multiplies after each epoch e with e % 10 == 0 (w_lb) or e % 30 == 0 (w_kl)
    want = {}
    for e in range(32):
        want[e] = (w_kl, w_lb)
        w_lb *= 0.9 if e % 10 == 0 else 1
        w_kl *= 0.5 if e % 30 == 0 else 1
    for e, (a, b) in got.items():
        assert a == pytest.approx(want[e][0]) and b == pytest.approx(want[e][1])


def test_two_view_digits_are_the_left_and_right_halves():
    from kdrun.data.sources import load_digits, load_digits_two_views

    two, one = load_digits_two_views(), load_digits()
    x = one.train_images[:, 0].float() / 255
    torch.testing.assert_close(two.train["view1"], x[:, :, :4].reshape(len(x), 32))
    torch.testing.assert_close(two.train["view2"], x[:, :, 4:].reshape(len(x), 32))
    assert torch.equal(two.train["target"], one.train_labels) and two.test["view1"].shape == (359, 32)


def test_the_masks_stage_copies_the_trained_models_and_trains_the_masks_only(tmp_path):
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    torch.manual_seed(0)
    cfg = validate(compose_cfg(["trainer.device=cpu", "trainer.progress=off", "trainer.tensorboard=false",
                                "stages.masks.optimizer.lr=1e-2"], recipe="digits_mst_distill"))
    trainer = Trainer(cfg, tmp_path)
    trainer.prepare()
    exp = trainer.experiment
    batch = next(iter(trainer.ctx.train_loader))
    first = trainer.stage_runner(0)
    first.train_step(batch, first.term_weights(0))
    trainer.ctx.record.stages.setdefault(first.key.label, {})
    teacher = {k: v.clone() for k, v in exp.models["teacher"].state_dict().items()}
    runner = trainer.stage_runner(1)
    masked = exp.models["t_fc1"]
    mask_before = [p.detach().clone() for p in masked.feature_mask.parameters()]
    assert all(torch.equal(masked.state_dict()[k], v) for k, v in teacher.items())
    assert len(runner.groups[0].params) == 4 * len(mask_before)  # four masks, no model weights
    runner.train_step(batch, runner.term_weights(0))
    assert all(torch.equal(masked.state_dict()[k], v) for k, v in teacher.items())  # the copy stays frozen
    assert all(torch.equal(exp.models["teacher"].state_dict()[k], v) for k, v in teacher.items())
    assert any(not torch.equal(a, p) for a, p in zip(mask_before, masked.feature_mask.parameters()))
    assert math.isfinite(float(runner.forward(batch, runner.term_weights(0))[0]))
