"""Pipelines beyond one frozen teacher: co-trained models with their own optimizers (gradient routing),
several teachers and their ensembles, self-distillation rounds, batch mixing, random teachers with a
student initialised from them and a linear probe; checkpoints and resume of all of it."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from kdrun.build import build, init_close_to
from kdrun.config import validate
from kdrun.data.mix import CutMix, Mixup
from kdrun.engine import run
from kdrun.engine.stage import StageRunner
from kdrun.engine.trainer import Trainer, seed_everything
from kdrun.engine.probe import fit_linear_probe
from kdrun.errors import KdrunError
from kdrun.models.ensemble import LogitEnsemble, TeacherRouter
from tests.conftest import compose_cfg

DIGITS = ["data=digits", "data.subset=128", "data.batch_size=32", "trainer.progress=off", "trainer.tensorboard=false",
          "trainer.deterministic=true", "trainer.device=cpu", "trainer.log_every=2"]
PLAIN_SGD = ["stages.main.optimizer.momentum=0", "stages.main.optimizer.weight_decay=0", "stages.main.scheduler=null"]
DML = DIGITS + PLAIN_SGD + ["student=cnn_tiny", "model@models.peer=cnn_tiny", "stages.main.epochs=2",
                            "stages.main.optimizer.lr=0.1"]


def dml_cfg(extra=()):
    return validate(compose_cfg(DML + list(extra), recipe="cifar100_dml"))


def runner_for(cfg, tmp_path, stage=0, dist=None):
    trainer = Trainer(cfg, tmp_path, dist=dist)
    experiment = trainer.prepare()
    return experiment, trainer.stage_runner(stage), trainer.ctx.train_loader


def weights(path):
    return torch.load(path, weights_only=True)["model"]


# ------------------------------------------------------------------ online distillation (co_train)


def test_online_peer_changes_only_through_its_own_loss(tmp_path):
    """One kdrun step of DML equals a hand-built two-model step in which each network's gradient is
    that of its own CE + KL(p_other || p_self) with the other network's output as a constant."""
    pipe, runner, loader = runner_for(dml_cfg(), tmp_path)
    assert [g.name for g in runner.groups] == ["main", "peer"] and runner.routed
    batch = next(iter(loader))
    s0, p0 = copy.deepcopy(pipe.models["student"]), copy.deepcopy(pipe.models["peer"])
    runner.train_step(batch, runner.term_weights(0))

    x, y = batch["input"], batch["target"]
    zs, zp = s0(x), p0(x)

    def kl(target_logits, logits):
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target_logits, -1), reduction="batchmean", log_target=True)

    gs = torch.autograd.grad(F.cross_entropy(zs, y) + kl(zp.detach(), zs), list(s0.parameters()))
    gp = torch.autograd.grad(F.cross_entropy(zp, y) + kl(zs.detach(), zp), list(p0.parameters()))
    for model, ref, grads in ((pipe.models["student"], s0, gs), (pipe.models["peer"], p0, gp)):
        for p, p_ref, g in zip(model.parameters(), ref.parameters(), grads):
            torch.testing.assert_close(p.detach(), p_ref.detach() - 0.1 * g, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.models["peer"].parameters(), p0.parameters()))


def test_share_gradients_lets_the_students_loss_reach_the_peer(tmp_path):
    """The leak is opt-in: with share_gradients the peer's update differs from the routed one."""
    routed_pipe, routed, loader = runner_for(dml_cfg(), tmp_path)
    shared_pipe, shared, _ = runner_for(dml_cfg(["stages.main.share_gradients=true"]), tmp_path)
    assert not shared.routed
    batch = next(iter(loader))
    routed.train_step(batch, routed.term_weights(0))
    shared.train_step(batch, shared.term_weights(0))
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(routed_pipe.models["peer"].parameters(),
                                                        shared_pipe.models["peer"].parameters())]
    assert max(diffs) > 1e-6


def test_dml_run_evaluates_both_models_and_resumes_every_optimizer(tmp_path):
    straight = run(dml_cfg(), tmp_path / "straight")
    assert set(straight["co_trained"]) == {"peer"} and straight["co_trained"]["peer"]["last_top1"] is not None
    assert {"student.pt", "peer.pt"} <= {p.name for p in (tmp_path / "straight").iterdir()}
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["stage"]["groups"]) == {"main", "peer"}
    assert all(g["optimizer"]["state"] or g["optimizer"]["param_groups"] for g in ckpt["stage"]["groups"].values())
    run(dml_cfg(["trainer.max_epochs=1"]), tmp_path / "split")
    resumed = run(dml_cfg(["resume=auto"]), tmp_path / "split")
    assert resumed["steps"] == straight["steps"]
    for name in ("student.pt", "peer.pt"):
        a, b = weights(tmp_path / "straight" / name), weights(tmp_path / "split" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_co_train_config_errors_name_the_key():
    with pytest.raises(KdrunError, match="already trained by"):
        dml_cfg(["stages.main.co_train.peer.train=[student]"])
    with pytest.raises(KdrunError, match=r"co_train.peer.losses: no loss term 'peer_cee'"):
        dml_cfg(["stages.main.co_train.peer.losses=[peer_cee]"])
    with pytest.raises(KdrunError, match="already used by"):
        dml_cfg(["stages.main.co_train.peer.losses=[kl]"])
    with pytest.raises(KdrunError, match=r"unknown key 'stages.main.co_train.peer.optimiser'"):
        dml_cfg(["+stages.main.co_train.peer.optimiser.lr=1"])


# ------------------------------------------------------------------ several teachers


def test_logit_ensemble_matches_a_hand_computation():
    z1, z2, z3 = torch.randn(3, 4, 5).unbind(0)
    torch.testing.assert_close(LogitEnsemble()([z1, z2, z3]), (z1 + z2 + z3) / 3)
    torch.testing.assert_close(LogitEnsemble([3.0, 1.0])([z1, z2]), 0.75 * z1 + 0.25 * z2)
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        LogitEnsemble([1.0, 1.0])([z1, z2, z3])
    with pytest.raises(ValueError, match="differ in shape"):
        LogitEnsemble()([z1, torch.randn(4, 6)])


def test_router_weights_teachers_per_sample_and_trains_only_through_its_own_group():
    router = TeacherRouter(in_features=6, num_teachers=2)
    f, z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(router(f, [z1, z2]), (z1 + z2) / 2)  # starts as the average
    with torch.no_grad():
        router.gate.weight.normal_()
    g = torch.softmax(f.detach() @ router.gate.weight.T + router.gate.bias, dim=-1)
    torch.testing.assert_close(router(f, [z1, z2]), g[:, :1] * z1 + g[:, 1:] * z2)
    router(f, [z1, z2]).sum().backward()
    assert f.grad is None  # the router does not train the network whose feature it reads


def test_multiteacher_router_recipe_keeps_both_teachers_frozen_and_trains_the_router(tmp_path):
    cfg = validate(compose_cfg(DIGITS + ["teacher=cnn_small", "model@models.teacher2=cnn_tiny", "student=cnn_tiny",
                                         "teacher.checkpoint=null", "models.teacher2.checkpoint=null",
                                         "stages.main.epochs=1", "stages.main.optimizer.lr=0.1"],
                               recipe="cifar100_multiteacher_router"))
    pipe, runner, loader = runner_for(cfg, tmp_path)
    assert pipe.stages[0].frozen_models == ["teacher", "teacher2"]
    assert [(g.name, g.adapters) for g in pipe.stages[0].groups] == [("main", ()), ("router", ("router",))]
    before = {n: copy.deepcopy(pipe.models[n].state_dict()) for n in ("teacher", "teacher2")}
    gate = pipe.adapters["router"].module.gate.weight.detach().clone()
    batch = next(iter(loader))
    runner.train_step(batch, runner.term_weights(0))
    for n, state in before.items():
        for k, v in pipe.models[n].state_dict().items():
            assert torch.equal(v, state[k]), (n, k)
    assert not torch.equal(pipe.adapters["router"].module.gate.weight, gate)


def test_two_frozen_teachers_are_bit_identical_after_training(tmp_path):
    cfg = validate(compose_cfg(DIGITS + ["teacher=cnn_small", "model@models.teacher2=cnn_tiny", "student=cnn_tiny",
                                         "teacher.checkpoint=null", "models.teacher2.checkpoint=null",
                                         "stages.main.epochs=1", "adapters.ensemble.weights=[2,1]"],
                               recipe="cifar100_multiteacher"))
    seed_everything(int(cfg.seed), False)
    pipe = build(cfg)
    start = {n: {k: v.clone() for k, v in pipe.models[n].state_dict().items()} for n in ("teacher", "teacher2")}
    del pipe
    run(cfg, tmp_path)  # the same seed builds the same random teachers
    after = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["modules"]
    for n, state in start.items():
        for k, v in state.items():
            assert torch.equal(after[f"models.{n}.{k}"], v), (n, k)


# ------------------------------------------------------------------ self-distillation rounds


BAN = DIGITS + PLAIN_SGD + ["student=cnn_tiny", "teacher.checkpoint=null", "stages.main.epochs=1",
                            "rounds.count=2", "rounds.weights.ce=[1.0,0.1]", "rounds.weights.kd=[0.0,0.9]"]


def test_two_rounds_export_two_students_and_round_two_learns_from_round_one(tmp_path, monkeypatch):
    seen = []
    original = StageRunner.term_weights

    def spy(self, epoch):
        out = original(self, epoch)
        if self.record.epoch == 0 and epoch == 0:
            seen.append((self.key.label, dict(out), {k: v.clone() for k, v in self.exp.models["teacher"].state_dict().items()}))
        return out

    monkeypatch.setattr(StageRunner, "term_weights", spy)
    summary = run(validate(compose_cfg(BAN, recipe="cifar100_bornagain")), tmp_path)
    r1, r2 = weights(tmp_path / "student_round1.pt"), weights(tmp_path / "student_round2.pt")
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)
    assert [e["round"] for e in summary["rounds"]] == [1, 2] and summary["random_models"] == []
    assert [key for key, _, _ in seen] == ["round1/main", "round2/main"]
    assert seen[0][1] == {"ce": 1.0, "kd": 0.0} and seen[1][1] == {"ce": pytest.approx(0.1), "kd": pytest.approx(0.9)}
    for k, v in r1.items():  # round 2's teacher is round 1's student
        assert torch.equal(seen[1][2][k], v), k
    assert summary["best_top1"] == summary["stages"]["round2/main"]["best_top1"]
    assert set(summary["frozen_top1"]) == {"round1/teacher", "round2/teacher"}


def test_rounds_resume_after_an_interruption_in_round_two(tmp_path, monkeypatch):
    cfg = validate(compose_cfg(BAN, recipe="cifar100_bornagain"))
    straight = run(cfg, tmp_path / "straight")
    original = StageRunner.run

    def crash_in_round_two(self):
        if self.key.round == 1:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(StageRunner, "run", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "split")
    state = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert state["record"]["round"] == 1 and state["record"]["stage_index"] == 0
    monkeypatch.setattr(StageRunner, "run", original)
    resumed = run(validate(compose_cfg(BAN + ["resume=auto"], recipe="cifar100_bornagain")), tmp_path / "split")
    assert resumed["steps"] == straight["steps"]
    for name in ("student_round1.pt", "student_round2.pt", "student.pt"):
        a, b = weights(tmp_path / "straight" / name), weights(tmp_path / "split" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_rounds_config_errors():
    with pytest.raises(KdrunError, match=r"rounds.weights.kd must list one number per round \(2\)"):
        validate(compose_cfg(BAN + ["rounds.weights.kd=[0.9]"], recipe="cifar100_bornagain"))
    with pytest.raises(KdrunError, match="rounds.weights.kdd: no loss term"):
        validate(compose_cfg(BAN + ["+rounds.weights.kdd=[1,1]"], recipe="cifar100_bornagain"))
    with pytest.raises(KdrunError, match="rounds.teacher and rounds.student must be different"):
        validate(compose_cfg(BAN + ["rounds.teacher=student"], recipe="cifar100_bornagain"))
    with pytest.raises(KdrunError, match="rounds.student: no stage trains 'teacher'"):
        build(validate(compose_cfg(BAN + ["rounds.student=teacher", "rounds.teacher=student"], recipe="cifar100_bornagain")))


# ------------------------------------------------------------------ batch transforms


def test_mixup_mixes_inputs_and_targets_consistently():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4)
    y = torch.arange(16) % 5
    out = Mixup(num_classes=5, alpha=0.4, per_sample=True)({"input": x, "target": y, "index": torch.arange(16)})
    q = out["soft_target"]
    torch.testing.assert_close(q.sum(1), torch.ones(16))
    assert torch.equal(out["target"], y)
    # every mixed image is lam * x_i + (1 - lam) * x_j with lam = q[i, y_i] (+ q[i, y_j] when y_i == y_j)
    lam = q.gather(1, y[:, None]).squeeze(1)
    for i in range(16):
        if lam[i] < 1 - 1e-6:
            rest = (out["input"][i] - lam[i] * x[i]) / (1 - lam[i])
            assert min(float((rest - x[j]).abs().max()) for j in range(16)) < 1e-4


def test_partial_mixup_mixes_the_given_fraction():
    torch.manual_seed(1)
    x, y = torch.randn(20, 1, 2, 2), torch.arange(20) % 10
    out = Mixup(num_classes=10, fraction=0.25, per_sample=True)({"input": x, "target": y})
    unchanged = (out["input"] == x).flatten(1).all(1)
    assert int((~unchanged).sum()) <= 5 and int(unchanged.sum()) >= 15
    torch.testing.assert_close(out["soft_target"][unchanged], F.one_hot(y, 10).float()[unchanged])


def test_cutmix_targets_follow_the_pasted_area():
    torch.manual_seed(2)
    x = torch.zeros(8, 1, 8, 8) + torch.arange(8.0).view(8, 1, 1, 1)  # image i is constant i
    y = torch.arange(8)
    out = CutMix(num_classes=8, alpha=1.0)({"input": x, "target": y})
    own = (out["input"] == x).flatten(1).float().mean(1)
    torch.testing.assert_close(out["soft_target"][torch.arange(8), y], own)


def test_mixup_gives_teacher_and_student_the_same_mixed_batch(tmp_path):
    cfg = validate(compose_cfg(DIGITS + ["teacher=cnn_small", "student=cnn_tiny", "teacher.checkpoint=null",
                                         "batch_transform=mixup", "stages.main.epochs=1"], recipe="cifar100_mixup_kd"))
    pipe, runner, loader = runner_for(cfg, tmp_path)
    seen = {}
    for name in ("teacher", "student"):
        pipe.models[name].register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].clone()))
    batch = next(iter(loader))
    runner.train_step(batch, runner.term_weights(0))
    assert torch.equal(seen["teacher"], seen["student"])
    assert not torch.equal(seen["student"], batch["input"])


def test_soft_target_without_a_transform_is_the_one_hot_target(tmp_path):
    cfg = validate(compose_cfg(DIGITS + ["teacher=cnn_small", "student=cnn_tiny", "teacher.checkpoint=null",
                                         "batch_transform=none", "loss.ce.standardize=false"], recipe="cifar100_mixup_kd"))
    pipe, runner, loader = runner_for(cfg, tmp_path)
    batch = next(iter(loader))
    runner.set_modes()
    _, values, _ = runner.forward({**batch, "soft_target": F.one_hot(batch["target"], 10).float()}, runner.term_weights(0))
    with torch.no_grad():
        expected = F.cross_entropy(pipe.models["student"](batch["input"]), batch["target"])
    torch.testing.assert_close(values["ce"], expected, rtol=1e-5, atol=1e-6)
    runner.train_step(batch, runner.term_weights(0))  # the engine supplies batch.soft_target itself


# ------------------------------------------------------------------ random teachers, init_from, probe


def test_init_from_copies_or_interpolates_towards_a_fresh_init():
    torch.manual_seed(0)
    teacher, student, fresh = (torch.nn.Linear(4, 3) for _ in range(3))
    init_close_to(student, teacher, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    init_close_to(student, teacher, 0.5, fresh=fresh)
    for s, t, f in zip(student.parameters(), teacher.parameters(), fresh.parameters()):
        torch.testing.assert_close(s, (t + 0.5 * f) / (1.25 ** 0.5))
    with pytest.raises(KdrunError, match="same architecture"):
        init_close_to(torch.nn.Linear(4, 2), teacher, 0.0)


def test_linear_probe_separates_separable_features():
    torch.manual_seed(0)
    centers = torch.randn(3, 8) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 8)
    res = fit_linear_probe(x[:240], y[:240], x[240:], y[240:], 3, epochs=20, lr=0.05, batch_size=64)
    assert res["probe_top1"] > 95


RANDOM = DIGITS + ["model@teacher.net.backbone=cnn_small", "teacher.net.out_dim=64", "teacher.net.hidden_dims=[32]",
                   "teacher.net.bottleneck_dim=16", "stages.main.epochs=1", "probe.epochs=2"]


def test_random_teacher_recipe_distils_a_frozen_random_teacher_and_probes_both(tmp_path):
    cfg = validate(compose_cfg(RANDOM, recipe="cifar10_random_teacher"))
    seed_everything(int(cfg.seed), False)
    pipe = build(cfg)
    assert all(torch.equal(a, b) for a, b in zip(pipe.models["student"].parameters(), pipe.models["teacher"].parameters()))
    assert pipe.shapes["student.logits"][1] == 64 and "student.feat" in {f"student.{t}" for t in pipe.models["student"].taps}
    teacher0 = {k: v.clone() for k, v in pipe.models["teacher"].state_dict().items()}
    assert pipe.random_models == []  # allow_random: a deliberate random teacher is not warned about
    del pipe
    summary = run(cfg, tmp_path)
    assert set(summary["probe"]) == {"student", "teacher"} and summary["probe_top1"] == summary["probe"]["student"]
    assert summary["best_top1"] is None  # a projection head has no class scores to rank
    after = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["modules"]
    for k, v in teacher0.items():
        assert torch.equal(after[f"models.teacher.{k}"], v), k
    student = weights(tmp_path / "student.pt")
    assert any(not torch.equal(student[k], teacher0[k]) for k in student)  # the student moved away from its copy
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("probe_top1/teacher" in r for r in rows)


def test_random_teacher_with_a_class_head_is_evaluated_by_its_own_head_and_the_probe(tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_cfg(RANDOM, recipe="cifar10_random_teacher")
    OmegaConf.set_struct(cfg, False)
    cfg.teacher.net = OmegaConf.create({"_target_": "kdrun.models.simple.simple_cnn", "num_classes": 10, "in_channels": 1})
    cfg.teacher.name = "cnn"
    summary = run(validate(cfg), tmp_path)
    assert summary["best_top1"] is not None and summary["probe_top1"] is not None
    assert summary["frozen_top1"]["teacher"] is not None


def test_projection_head_replaces_the_unused_classifier():
    from kdrun.models.heads import WithProjectionHead
    from kdrun.models.resnet import resnet8

    model = WithProjectionHead({"name": "resnet8", "net": resnet8(num_classes=10)}, [3, 32, 32], hidden_dims=[16],
                               bottleneck_dim=8, out_dim=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 32) and float(out.detach().abs().max()) <= 1 + 1e-5  # cosine similarities
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # no parameter without a gradient (DDP-safe)
    with pytest.raises(ValueError, match="no tap 'fet'"):
        WithProjectionHead(resnet8(num_classes=10), [3, 32, 32], tap="fet")


def test_probe_config_errors():
    with pytest.raises(KdrunError, match="probe.models: no model 'studnet'"):
        validate(compose_cfg(RANDOM + ["probe.models=[studnet]"], recipe="cifar10_random_teacher"))
    with pytest.raises(KdrunError, match="probe.tap: teacher has no tap 'fet'. Did you mean 'feat'"):
        build(validate(compose_cfg(RANDOM + ["probe.tap=fet"], recipe="cifar10_random_teacher")))
    with pytest.raises(KdrunError, match="objective=probe_top1 needs a linear probe"):
        validate(compose_cfg(RANDOM + ["probe=null"], recipe="cifar10_random_teacher"))


# ------------------------------------------------------------------ from the command line


def test_cli_runs_a_co_trained_recipe_and_names_a_bad_round_weight(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli(["+recipe=cifar100_dml", "data=digits", "data.subset=64", "student=cnn_tiny", "model@models.peer=cnn_tiny",
                    "stages.main.epochs=1", "trainer.progress=off", "trainer.tensorboard=false", "trainer.device=cpu",
                    f"hydra.run.dir={tmp_path / 'dml'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "dml" / "summary.json").read_text())
    assert summary["method"] == "DML" and "peer" in summary["co_trained"]
    proc = run_cli(["+recipe=cifar100_bornagain", "data=digits", "student=cnn_tiny", "teacher.checkpoint=null",
                    "rounds.weights.kd=[1]", f"hydra.run.dir={tmp_path / 'ban'}"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rounds.weights.kd must list one number per round (3)" in out
    assert "Traceback" not in out


def test_ddp_wraps_exactly_the_trained_models(tmp_path, monkeypatch):
    """Under DDP (a one-rank gloo group here) every trained model of every optimizer group is wrapped,
    frozen teachers are not, trainable adapters' parameters are in the runner's one gradient all-reduce
    (not wrapped), and a routed step runs through the wrappers."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kdrun.engine.distributed import DistInfo

    class OneRankDDP(DistInfo):
        @property
        def enabled(self) -> bool:
            return True

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29581")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cases = {
            "cifar100_multiteacher_router": (["teacher=cnn_small", "model@models.teacher2=cnn_tiny", "student=cnn_tiny",
                                              "teacher.checkpoint=null", "models.teacher2.checkpoint=null"],
                                             {"student"}, {"teacher", "teacher2"}),
            "cifar100_bdkd": (["teacher=cnn_small", "student=cnn_tiny"], {"student", "teacher"}, set()),
        }
        for recipe, (extra, wrapped, frozen) in cases.items():
            cfg = validate(compose_cfg(DIGITS + extra + ["stages.main.epochs=1"], recipe=recipe))
            pipe, runner, train = runner_for(cfg, tmp_path / recipe, dist=OneRankDDP(0, 0, 1))
            ddp = {k for k, v in runner.forwards.items() if isinstance(v, DistributedDataParallel)}
            assert ddp == wrapped, recipe
            adapters = [p for spec in pipe.adapters.values() if spec.trainable for p in spec.module.parameters()]
            assert all(any(p is q for q in runner.module_params) for p in adapters), recipe
            assert not frozen & ddp and set(pipe.stages[0].frozen_models) == frozen
            runner.train_step(next(iter(train)), runner.term_weights(0))
    finally:
        dist.destroy_process_group()
