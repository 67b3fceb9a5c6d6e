"""The engine: stages, frozen teachers, checkpoints, exact resume, exported weights."""
import json

import pytest
import torch

from kdrun.build import build
from kdrun.config import validate
from kdrun.engine import run
from kdrun.engine.checkpoint import atomic_save
from kdrun.errors import KdrunError
from tests.conftest import compose_cfg

FAST = ["data.subset=192", "trainer.progress=off", "trainer.tensorboard=false", "trainer.deterministic=true",
        "trainer.log_every=4"]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_quickstart_runs_both_stages_and_writes_the_run_directory(tmp_path):
    cfg = validate(compose_cfg(FAST + ["trainer.max_epochs=2"]))
    summary = run(cfg, tmp_path)
    assert set(summary["stages"]) == {"teacher", "distill"}
    assert summary["eval_model"] == "student" and summary["best_top1"] >= summary["last_top1"] - 1e-9
    for name in ("summary.json", "metrics.jsonl", "config.yaml", "student.pt", "teacher.pt",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert {"best_top1", "last_top1", "wall_time_s"} <= set(on_disk)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/kd" in r and "loss/ce" in r for r in rows)
    assert any(r.get("model") == "teacher" and "frozen_top1" in r for r in rows)
    # the exported student holds the student's weights only (no teacher, adapters or loss modules)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert set(weights(tmp_path / "student.pt")) == {k[len("models.student."):] for k in ckpt["modules"] if k.startswith("models.student.")}


def test_frozen_teacher_is_bit_identical_and_gets_no_gradient(tmp_path):
    cfg = validate(compose_cfg(FAST + ["trainer.max_epochs=1"]))
    first = run(cfg, tmp_path / "a")
    teacher = tmp_path / "a" / "teacher.pt"
    cfg2 = validate(compose_cfg(FAST + ["trainer.max_epochs=1", f"teacher.checkpoint={teacher}",
                                        "stages.teacher.epochs=1", "stages.teacher.losses=[teacher_ce]"]))
    # a run whose only stage distils from the loaded teacher
    cfg2.stages.pop("teacher")
    run(cfg2, tmp_path / "b")
    after = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["modules"]
    for k, v in weights(teacher).items():
        assert torch.equal(after[f"models.teacher.{k}"], v), k
    assert first["frozen_top1"]["teacher"] == pytest.approx(first["stages"]["teacher"]["last_top1"])


def test_resume_continues_exactly(tmp_path):
    base = FAST + ["stages.teacher.epochs=1", "stages.distill.epochs=2"]
    straight = run(validate(compose_cfg(base)), tmp_path / "straight")
    run(validate(compose_cfg(base + ["stages.distill.epochs=2", "trainer.max_epochs=1"])), tmp_path / "split")
    resumed = run(validate(compose_cfg(base + ["resume=auto"])), tmp_path / "split")
    for name in ("student.pt", "teacher.pt"):
        a, b = weights(tmp_path / "straight" / name), weights(tmp_path / "split" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert resumed["last_top1"] == straight["last_top1"] and resumed["steps"] == straight["steps"]

    def epoch_rows(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["stage"], r["epoch"], r["loss/total"], r["top1"]) for r in rows if "top1" in r and "epoch_time_s" in r]

    assert epoch_rows(tmp_path / "straight")[-1] == epoch_rows(tmp_path / "split")[-1]


def test_resume_from_a_path_and_mismatched_stages(tmp_path):
    run(validate(compose_cfg(FAST + ["trainer.max_epochs=1"])), tmp_path / "a")
    with pytest.raises(KdrunError, match="stages"):
        cfg = validate(compose_cfg(FAST + ["trainer.max_epochs=1", f"resume={tmp_path / 'a'}"]))
        cfg.stages.pop("teacher")
        cfg.stages.distill.train = ["student"]
        run(cfg, tmp_path / "b")
    with pytest.raises(KdrunError, match="no checkpoint"):
        run(validate(compose_cfg(FAST + [f"resume={tmp_path / 'nothing'}"])), tmp_path / "c")


def test_random_teacher_is_flagged(tmp_path):
    cfg = validate(compose_cfg(FAST + ["trainer.max_epochs=1"]))
    cfg.stages.pop("teacher")
    pipe = build(cfg)
    assert pipe.random_models == ["teacher"]
    summary = run(cfg, tmp_path)
    assert summary["random_models"] == ["teacher"]


def test_non_finite_loss_stops_with_the_term_named(tmp_path):
    cfg = validate(compose_cfg(FAST + ["trainer.max_epochs=1", "stages.teacher.optimizer.lr=1e12",
                                       "trainer.log_every=1"]))
    with pytest.raises(KdrunError, match="teacher_ce"):
        run(cfg, tmp_path)


def test_warmup_ramps_the_weight(tmp_path):
    from kdrun.engine.trainer import Trainer

    trainer = Trainer(validate(compose_cfg(FAST + ["loss.kd.warmup_epochs=4"])), tmp_path)
    trainer.prepare()
    runner = trainer.stage_runner(1)
    assert runner.term_weights(0)["kd"] == pytest.approx(0.9 / 4)
    assert runner.term_weights(3)["kd"] == pytest.approx(0.9)
    assert runner.term_weights(10)["ce"] == pytest.approx(0.1)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_long_tailed_runs_report_shot_groups_and_kept_indices(tmp_path, monkeypatch):
    import kdrun.data.sources as sources
    from kdrun.data.longtail import load_cifar_lt

    def fake_cifar(root, variant="cifar100", download=False):  # 500/100 images per class, tiny
        gen = torch.Generator().manual_seed(0)
        y_train = torch.arange(100).repeat_interleave(500)
        y_test = torch.arange(100).repeat_interleave(2)
        from kdrun.data.arrays import ArraySplits
        return ArraySplits(torch.randint(0, 255, (50000, 3, 4, 4), generator=gen, dtype=torch.uint8), y_train,
                           torch.randint(0, 255, (200, 3, 4, 4), generator=gen, dtype=torch.uint8), y_test)

    monkeypatch.setattr(sources, "load_cifar", fake_cifar)
    import kdrun.data.longtail as longtail
    monkeypatch.setattr(longtail, "load_cifar", fake_cifar, raising=False)
    assert len(load_cifar_lt("x", 100).train_labels) == 10847
    cfg = validate(compose_cfg(["data=cifar100_lt", "data.input_shape=[3,4,4]", "data.crop_padding=0",
                                "teacher.net.in_channels=3", "student.net.in_channels=3", "trainer.max_epochs=1",
                                "trainer.max_steps_per_epoch=2", "trainer.progress=off", "trainer.tensorboard=false"]))
    summary = run(cfg, tmp_path)
    assert set(summary["shot_top1"]) == {"many", "medium", "few"}
    kept = json.loads((tmp_path / "kept_indices.json").read_text())
    assert len(kept["kept_indices"]) == 10847 and kept["train_class_counts"][0] == 500 and kept["train_class_counts"][99] == 5


def test_evaluate_group_accuracy_by_hand():
    from torch import nn

    from kdrun.data.arrays import ArrayLoader
    from kdrun.engine.evaluate import evaluate

    class Oracle(nn.Module):  # right on classes 0-4, wrong on 5-9; reads the label hidden in the pixels
        def forward(self, x):
            y = (x[:, 0, 0, 0] * 0.25 + 0.5).mul(255).round().long()  # undo the loader's normalisation
            pred = torch.where(y < 5, y, (y + 1) % 10)
            return nn.functional.one_hot(pred, 10).float()

    labels = torch.arange(10).repeat(3)
    images = labels.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).to(torch.uint8).contiguous()
    loader = ArrayLoader(images, labels, batch_size=7, train=False, mean=[0.5], std=[0.25], device="cpu")
    groups = {"low": torch.arange(10) < 5, "high": torch.arange(10) >= 5, "three": torch.arange(10) == 3}
    ev = evaluate(Oracle(), loader, class_groups=groups)
    assert ev["top1"] == pytest.approx(50.0)
    assert ev["group_top1"] == {"low": pytest.approx(100.0), "high": pytest.approx(0.0), "three": pytest.approx(100.0)}
