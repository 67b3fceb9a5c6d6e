"""Taps: forward hooks at module paths publish exactly the module outputs, only when asked for."""
import pytest
import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.simple import simple_cnn
from kdrun.taps import TapRecorder, declared_taps


def test_recorder_captures_the_module_outputs():
    model = simple_cnn(num_classes=5, in_channels=3, width=4, depth=2).eval()
    rec = TapRecorder(model, "student", declared_taps(model), {"stage1", "stage2_pre", "feat"})
    x = torch.randn(2, 3, 8, 8)
    logits = model(x)
    out = rec.pop()
    assert set(out) == {"stage1", "stage2_pre", "feat"}
    assert rec.pop() == {}
    rec.active = False  # recomputing references below must not record
    stage1 = model.blocks[0](x)
    assert torch.equal(out["stage1"], model.blocks[0].relu(model.blocks[0].bn(model.blocks[0].conv(x))))
    assert out["feat"].shape == (2, 8) and torch.allclose(model.fc(out["feat"]), logits)
    assert (out["stage2_pre"] < 0).any(), "a pre-activation tap must be taken before the ReLU"
    assert stage1.shape == (2, 4, 4, 4)
    assert rec.pop() == {}


def test_extra_taps_from_config_and_unused_taps_are_not_hooked():
    model = simple_cnn(num_classes=5, in_channels=3, width=4, depth=2)
    taps = declared_taps(model, {"conv1": "blocks.0.conv"})
    rec = TapRecorder(model, "teacher", taps, {"conv1"})
    model(torch.randn(1, 3, 8, 8))
    assert set(rec.pop()) == {"conv1"}
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert hooked == [model.blocks[0].conv]
    rec.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_unknown_tap_or_path_is_a_clear_error():
    model = simple_cnn(num_classes=5, in_channels=3, width=4, depth=2)
    with pytest.raises(KdrunError, match="Did you mean 'stage2'"):
        TapRecorder(model, "student", declared_taps(model), {"stage22"})
    with pytest.raises(KdrunError, match="no module 'blocks.9'"):
        TapRecorder(model, "student", {"x": "blocks.9"}, {"x"})


def test_any_module_can_be_tapped_by_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    rec = TapRecorder(model, "m", {"hidden": "1"}, {"hidden"})
    x = torch.randn(5, 3)
    model(x)
    assert torch.equal(rec.pop()["hidden"], torch.relu(model[0](x)))


def test_tap_groups_expand_to_lists_and_aliases():
    from kdrun.taps import expand_groups, tap_groups

    model = simple_cnn(num_classes=5, in_channels=3, width=4, depth=3)
    groups = tap_groups(declared_taps(model))
    assert groups["stages"] == ["stage1", "stage2", "stage3"] and groups["last_stage"] == "stage3"
    assert groups["stages_pre"] == ["stage1_pre", "stage2_pre", "stage3_pre"]
    out = expand_groups({"student": "s.stages", "teacher": ["t.last_stage", "t.feat"], "x": "batch.input"},
                        {"s": groups, "t": groups})
    assert out == {"student": ["s.stage1", "s.stage2", "s.stage3"], "teacher": ["t.stage3", "t.feat"], "x": "batch.input"}
