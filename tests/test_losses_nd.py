"""ND (Wang et al., arXiv 2305.17007): the loss against the authors' per-sample formula, the EmbTrans projection,
and the class centres computed by the engine's class-means pass (kdrun.engine.statistics)."""
from __future__ import annotations

import pytest
import torch

from kdrun.component import BuildContext
from kdrun.losses import NDLoss
from kdrun.losses.nd import nd_loss


def _reference(s, t, centers, y):
    """The authors' DirectNormLoss.project_center, one sample at a time, divided by the batch size."""
    total = 0.0
    for si, ti, yi in zip(s, t, y):
        e = centers[int(yi)] / centers[int(yi)].norm(p=2)
        total += 1 - torch.dot(si, e) / max(si.norm(p=2), ti.norm(p=2))
    return total / len(y)


def test_nd_loss_matches_the_per_sample_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(9, 6, generator=g, dtype=torch.float64), 3 * torch.randn(9, 6, generator=g, dtype=torch.float64)
    centers, y = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (9,), generator=g)
    torch.testing.assert_close(nd_loss(s.float(), t.float(), centers, y).double(), _reference(s, t, centers, y),
                               rtol=1e-5, atol=1e-6)
    # a student on its class centre's direction with the larger norm has zero loss
    on = 5 * torch.nn.functional.normalize(centers, dim=1)[y]
    assert nd_loss(on, torch.ones_like(on) * 0.1, centers, y).abs() < 1e-6


def _term(d_s, d_t, **kw):
    term = NDLoss(num_classes=4, **kw)
    term.setup(BuildContext(shapes={"student": torch.Size([8, d_s]), "teacher": torch.Size([8, d_t]),
                                    "target": torch.Size([8])}, num_train=8))
    term.check_shapes(torch.Size([8, d_s]), torch.Size([8, d_t]), torch.Size([8]))
    return term


def test_projection_only_when_the_widths_differ():
    assert _term(6, 6).projection is None
    proj = _term(5, 6).projection
    assert [type(m).__name__ for m in proj] == ["BatchNorm1d", "Dropout", "Linear"] and proj[2].out_features == 6
    assert torch.all(proj[2].bias == 0)
    with pytest.raises(ValueError, match="projection"):
        _term(5, 6, projection=False)


def test_the_term_asks_for_centres_until_it_has_them_and_checkpoints_them():
    term = _term(6, 6)
    assert term.class_mean_inputs() == ("teacher",)
    means = torch.randn(4, 6)
    term.set_class_means({"teacher": means})
    assert term.class_mean_inputs() == ()
    fresh = _term(6, 6)
    fresh.load_state_dict(term.state_dict())
    assert fresh.class_mean_inputs() == () and torch.equal(fresh.centers, means)


def test_the_engine_computes_the_teachers_class_centres_before_training(tmp_path):
    from kdrun.config import validate
    from kdrun.engine.probe import extract
    from kdrun.engine.trainer import Trainer
    from kdrun.data.loaders import make_loader
    from tests.conftest import compose_cfg

    cfg = validate(compose_cfg(["data=synthetic", "data.num_classes=5", "data.batch_size=8", "data.eval_batch_size=8",
                                "data.source.num_train=40", "data.source.num_test=8", "teacher=resnet8", "student=resnet8",
                                "teacher.checkpoint=null", "trainer.device=cpu", "trainer.progress=off",
                                "trainer.tensorboard=false", "trainer.max_epochs=1", "trainer.max_steps_per_epoch=1"],
                               recipe="cifar100_kd_nd"))
    trainer = Trainer(cfg, tmp_path)
    exp = trainer.prepare()
    term = exp.losses["nd"].module
    assert term.class_mean_inputs() == ("teacher",)
    runner = trainer.stage_runner(0)
    assert term.class_mean_inputs() == ()
    # the authors' KD ramp min(1, epoch / 20) from epoch 0 (warmup_offset: 0); mdistiller's starts at 1/20
    w = exp.losses["kd"].weight
    assert [runner.term_weights(e)["kd"] for e in (0, 1, 20)] == [0.0, pytest.approx(w / 20), w]
    loader = make_loader(exp.data, "train", exp.cfg.data, exp.device, train=False, seed=cfg.seed)
    feats, labels = extract(exp, "teacher", "feat", loader)
    want = torch.stack([feats[labels == c].mean(0) for c in range(5)])
    torch.testing.assert_close(term.centers, want, rtol=1e-5, atol=1e-6)
    saved = torch.load(tmp_path / "class_means" / "nd.pt", weights_only=True)
    torch.testing.assert_close(saved["means"]["teacher"], want, rtol=1e-5, atol=1e-6)
    assert saved["tensors"] == {"teacher": "teacher.feat"} and int(saved["counts"].sum()) == 40


ND_ARGS = ["data=synthetic", "data.num_classes=5", "data.batch_size=8", "data.eval_batch_size=8", "data.source.num_train=40",
           "data.source.num_test=8", "teacher=resnet8", "student=resnet8", "teacher.checkpoint=null", "trainer.device=cpu",
           "trainer.progress=off", "trainer.tensorboard=false", "trainer.max_epochs=1", "trainer.max_steps_per_epoch=1"]


def _centres_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from kdrun.config import validate
    from kdrun.engine.distributed import DistInfo
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(validate(compose_cfg(ND_ARGS, recipe="cifar100_kd_nd")), f"{out}.run", dist=DistInfo(rank, rank, world))
        exp = trainer.prepare()
        trainer.stage_runner(0)
        torch.save(exp.losses["nd"].module.centers.clone(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_class_centres_under_ddp_are_those_of_the_whole_training_set(tmp_path):
    """Each rank averages its shard; the sums and counts are all-reduced, so both ranks hold the one-process centres."""
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    torch.multiprocessing.spawn(_centres_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "c")), nprocs=2)
    trainer = Trainer(validate(compose_cfg(ND_ARGS, recipe="cifar100_kd_nd")), tmp_path / "one")
    exp = trainer.prepare()
    trainer.stage_runner(0)
    want = exp.losses["nd"].module.centers
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"c.{rank}", weights_only=True), want, rtol=1e-5, atol=1e-6)
