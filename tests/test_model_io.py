"""Models with named inputs and structured outputs: each model reads its own batch fields, batch
transforms add fields, and tuple / dict outputs become named tensors beside the taps."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.build import build
from kdrun.config import validate
from kdrun.engine import run
from kdrun.engine.trainer import Trainer
from kdrun.errors import KdrunError
from kdrun.model_io import ModelIO
from kdrun.taps import TapRecorder
from tests.conftest import compose_cfg

FAST = ["data.subset=128", "trainer.progress=off", "trainer.tensorboard=false", "trainer.max_epochs=1",
        "trainer.device=cpu", "trainer.save_checkpoints=false"]
HELPERS = "tests.helpers"


def quickstart(extra=(), **nodes):
    """The quickstart config with some nodes replaced (as a recipe of one's own would write them)."""
    cfg = compose_cfg(FAST + list(extra))
    OmegaConf.set_struct(cfg, False)
    for key, value in nodes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return validate(cfg)


def test_a_teacher_on_the_clean_image_and_a_student_on_a_field_a_transform_adds(tmp_path):
    cfg = quickstart(**{"batch_transform": {"_target_": f"{HELPERS}.AddFlipped"}, "student.inputs": {"x": "batch.flipped"}})
    trainer = Trainer(cfg, tmp_path)
    exp = trainer.prepare()
    assert exp.shapes["batch.flipped"] == exp.shapes["batch.input"]
    seen = {}
    for name in ("teacher", "student"):
        exp.models[name].register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen.__setitem__(name, (args[0] if args else kwargs["x"]).clone()),
            with_kwargs=True)
    runner = trainer.stage_runner(1)
    batch = next(iter(trainer.ctx.train_loader))
    runner.train_step(batch, runner.term_weights(0))
    assert torch.equal(seen["teacher"], batch["input"])
    assert torch.equal(seen["student"], batch["input"].flip(-1)) and not torch.equal(seen["student"], seen["teacher"])


def test_dict_and_tuple_outputs_are_named_and_read_by_loss_terms(tmp_path):
    net = {"num_classes": 10, "in_channels": 1}
    pkt = {"_target_": "kdrun.losses.PKTLoss", "weight": 1.0, "inputs": {"student": "student.pooled", "teacher": "teacher.pooled"}}
    cfg = quickstart(**{"student.net": {"_target_": f"{HELPERS}.DictOutputCNN", **net},
                        "teacher.net": {"_target_": f"{HELPERS}.TupleOutputCNN", **net},
                        "teacher.outputs": ["logits", "pooled"], "loss.pkt": pkt,
                        "stages.distill.losses": ["ce", "kd", "pkt"]})
    exp = build(cfg)
    assert exp.shapes["student.logits"] == exp.shapes["teacher.logits"] == (2, 10)
    assert exp.shapes["student.pooled"] == (2, 16) and exp.shapes["teacher.pooled"] == (2, 16)
    assert "student.unused" not in exp.shapes  # None fields of a dict (ModelOutput) are dropped
    summary = run(cfg, tmp_path)
    assert summary["stages"]["distill"]["last_top1"] is not None  # evaluated through the dict's logits
    rows = [r for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss/pkt"' in r]
    assert rows


def test_default_names_of_a_tuple_output():
    io = ModelIO("m", TapRecorder(torch.nn.Identity(), "m", {}, set()))
    ns = {}
    io.publish((torch.zeros(1), torch.ones(1), torch.ones(2)), ns)
    assert list(ns) == ["m.logits", "m.output1", "m.output2"]
    with pytest.raises(KdrunError, match="returned 3 values but m.outputs names 2"):
        ModelIO("m", io.recorder, outputs=["a", "b"]).publish((torch.zeros(1),) * 3, {})


def test_keyword_inputs_from_several_batch_fields(tmp_path):
    cfg = quickstart(**{"batch_transform": {"_target_": f"{HELPERS}.AddScale"},
                        "student.net": {"_target_": f"{HELPERS}.KeywordCNN", "num_classes": 10, "in_channels": 1},
                        "student.inputs": {"image": "batch.input", "scale": "batch.scale"}})
    summary = run(cfg, tmp_path)
    assert summary["stages"]["distill"]["last_top1"] is not None


def test_bad_model_inputs_and_reads_name_the_key():
    with pytest.raises(KdrunError, match=r"student.inputs: the batch has no field 'nothere'"):
        build(quickstart(**{"student.inputs": {"x": "batch.nothere"}}))
    with pytest.raises(KdrunError, match=r"student.inputs.x: 'teacher.logits' is not a batch field"):
        build(quickstart(**{"student.inputs": {"x": "teacher.logits"}}))
    net = {"_target_": f"{HELPERS}.DictOutputCNN", "num_classes": 10, "in_channels": 1}
    with pytest.raises(KdrunError, match=r"student.inputs reads batch.extra, which evaluation batches lack"):
        build(quickstart(**{"batch_transform": {"_target_": f"{HELPERS}.TrainOnlyField"}, "student.inputs": {"x": "batch.extra"}}))
    with pytest.raises(KdrunError, match=r"'student.poold' is not a tap or an output of student .*Did you mean 'pooled'"):
        build(quickstart(**{"student.net": net, "loss.kd.inputs.student": "student.poold"}))
