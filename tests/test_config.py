"""Validation: every user mistake gives one message naming the key, with a suggestion."""
import pytest
from omegaconf import OmegaConf

from kdrun.build import build
from kdrun.config import validate
from kdrun.errors import KdrunError, did_you_mean
from tests.conftest import compose_cfg


def errors_of(overrides):
    with pytest.raises(KdrunError) as info:
        build(validate(compose_cfg(overrides)))
    return str(info.value)


def test_quickstart_config_is_valid_and_completed():
    cfg = validate(compose_cfg([]))
    assert cfg.stages.distill.scheduler_interval == "epoch"
    assert cfg.teacher.checkpoint is None and cfg.student.name == "cnn_tiny"
    assert OmegaConf.is_missing(cfg, "name") is False


def test_validate_does_not_mutate_input():
    cfg = compose_cfg([])
    before = OmegaConf.to_yaml(cfg)
    validate(cfg)
    assert OmegaConf.to_yaml(cfg) == before


def test_unknown_added_key_is_named():
    assert "trainer.typo" in errors_of(["+trainer.typo=3"])


def test_misspelt_loss_argument_suggests_the_right_one():
    msg = errors_of(["+loss.kd.temprature=3"])
    assert "loss.kd.temprature" in msg and "Did you mean 'temperature'" in msg


def test_wrong_type_is_named():
    assert "trainer.max_epochs" in errors_of(["trainer.max_epochs=abc"])


def test_unknown_loss_in_stage_suggests():
    msg = errors_of(["stages.distill.losses=[ce,kdd]"])
    assert "kdd" in msg and "Did you mean 'kd'" in msg


def test_unknown_tap_suggests_and_lists_taps():
    msg = errors_of(["loss.kd.inputs.teacher=teacher.stag3"])
    assert "teacher.stag3" in msg and "Did you mean 'stage3'" in msg


def test_unknown_forward_input_is_named():
    msg = errors_of(["+loss.kd.inputs.studnt=student.logits"])
    assert "loss.kd.inputs.studnt" in msg and "Did you mean 'student'" in msg


def test_shape_mismatch_found_at_build_time_names_term_and_shapes():
    msg = errors_of(["loss.kd.inputs.teacher=teacher.feat"])
    assert "loss.kd" in msg and "(2, 10)" in msg and "(2, 128)" in msg


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    msg = errors_of([f"teacher.checkpoint={tmp_path}/none.pt"])
    assert "teacher.checkpoint" in msg and "none.pt" in msg and "checkpoint=null" in msg


def test_missing_value_is_named():
    msg = errors_of(["stages.distill.epochs=???"])
    assert "stages.distill.epochs" in msg


def test_stage_training_unread_model_is_an_error():
    assert "trains 'student'" in errors_of(["stages.teacher.train=[teacher,student]"])


def test_did_you_mean():
    assert did_you_mean("temprature", ["temperature", "standardize"]) == " Did you mean 'temperature'?"
    assert did_you_mean("zzz", ["temperature"]) == ""
