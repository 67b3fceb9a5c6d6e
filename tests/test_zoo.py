"""The CIFAR zoo: parameter counts of the benchmark, checkpoint-compatible names, taps and their shapes."""
import pytest
import torch

from kdrun.models import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from kdrun.taps import TapRecorder, declared_taps, tap_groups

BUILDERS = {
    **{n: getattr(resnet, n) for n in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                                       "resnet8x4", "resnet32x4")},
    **{n: getattr(wrn, n) for n in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{n: getattr(vgg, n) for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "mobilenetv2": mobilenetv2.mobilenetv2, "shufflenetv1": shufflenetv1.shufflenetv1,
    "shufflenetv2": shufflenetv2.shufflenetv2, "resnet50": resnetv2.resnet50,
}
# millions of parameters with 100 classes, as the CRD/DKD benchmark reports them
PARAMS = {"resnet20": 0.278, "resnet56": 0.862, "resnet110": 1.737, "resnet8x4": 1.234, "resnet32x4": 7.434,
          "wrn_16_2": 0.703, "wrn_40_1": 0.570, "wrn_40_2": 2.255, "vgg8": 3.965, "vgg13": 9.462, "resnet50": 23.705,
          "mobilenetv2": 0.813, "shufflenetv1": 0.949, "shufflenetv2": 1.356}
# (stem, stage shapes (C, H) per stage, feat dim) for a 32x32 input
SHAPES = {
    "resnet8x4": ((32, 32), [(64, 32), (128, 16), (256, 8)], 256),
    "resnet32x4": ((32, 32), [(64, 32), (128, 16), (256, 8)], 256),
    "resnet56": ((16, 32), [(16, 32), (32, 16), (64, 8)], 64),
    "wrn_40_2": ((16, 32), [(32, 32), (64, 16), (128, 8)], 128),
    "vgg13": ((64, 32), [(128, 16), (256, 8), (512, 4), (512, 4)], 512),
    "mobilenetv2": ((16, 16), [(12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "shufflenetv1": ((24, 32), [(240, 16), (480, 8), (960, 4)], 960),
    "shufflenetv2": ((24, 32), [(116, 16), (232, 8), (464, 4)], 1024),
    "resnet50": ((64, 32), [(256, 32), (512, 16), (1024, 8), (2048, 4)], 2048),
}
# a sample of the parameter/buffer names of the published checkpoints (RepDistiller's models)
KEYS = {
    "resnet8x4": ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
                  "layer1.0.downsample.1.running_var", "layer3.0.bn2.num_batches_tracked", "fc.weight", "fc.bias"],
    "wrn_40_2": ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                 "block3.layer.5.conv2.weight", "bn1.running_var", "fc.bias"],
    "vgg13": ["block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block0.3.weight", "block4.4.weight",
              "classifier.weight"],
    "mobilenetv2": ["conv1.0.weight", "conv1.1.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.running_mean",
                    "conv2.0.weight", "conv2.1.bias", "classifier.0.weight"],
    "shufflenetv1": ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn3.running_var",
                     "layer3.3.conv3.weight", "linear.weight"],
    "shufflenetv2": ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.bn5.weight", "layer1.3.conv3.weight",
                     "conv2.weight", "bn2.running_mean", "linear.bias"],
    "resnet50": ["conv1.weight", "layer1.0.shortcut.0.weight", "layer1.0.shortcut.1.running_mean", "layer4.2.bn3.weight",
                 "linear.weight"],
}
# state-dict sizes of the reference models, counted from their definitions: a conv has 1 entry, a
# BatchNorm 5 (weight, bias, running mean/var, num_batches_tracked), a linear layer 2
KEY_COUNTS = {
    "resnet8x4": 6 + 3 * (12 + 6) + 2,  # stem; 3 stages of one block (2 conv-BN) with a projection; fc
    "resnet20": 6 + 9 * 12 + 2 * 6 + 2,  # stem; 9 blocks; projections in stages 2 and 3; fc
    "vgg8": 5 * (2 + 5) + 2,  # 5 blocks of one conv (with bias) + BN; classifier
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builds_runs_and_declares_standard_taps(name):
    model = BUILDERS[name](num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    taps = declared_taps(model)
    stages = tap_groups(taps)["stages"]
    assert {"stem", "feat"} <= set(taps) and stages[0] == "stage1"
    for tap in stages:
        assert f"{tap}_pre" in taps
    for path in taps.values():
        model.get_submodule(path)
    if name in PARAMS:
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tap_shapes_and_preactivations(name):
    model = BUILDERS[name](num_classes=100).eval()
    taps = declared_taps(model)
    rec = TapRecorder(model, name, taps, set(taps))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    out = rec.pop()
    (stem_c, stem_h), stages, feat = SHAPES[name]
    assert out["stem"].shape == (2, stem_c, stem_h, stem_h)
    for k, (c, h) in enumerate(stages, start=1):
        assert out[f"stage{k}"].shape == (2, c, h, h), (k, out[f"stage{k}"].shape)
        assert out[f"stage{k}_pre"].shape == (2, c, h, h)
    assert out["feat"].shape == (2, feat)
    assert torch.allclose(model.get_submodule([p for p in dict(model.named_modules()) if p.endswith(("fc", "linear", "classifier"))][-1])(out["feat"]), logits, atol=1e-5)
    if name not in ("mobilenetv2", "wrn_40_2"):  # these stage outputs are linear (no ReLU after them)
        last = len(stages)
        assert (out[f"stage{last}_pre"] < 0).any() and (out[f"stage{last}"] >= 0).all()
        assert torch.allclose(out[f"stage{last}"], torch.relu(out[f"stage{last}_pre"])) or name == "shufflenetv2"


@pytest.mark.parametrize("name", sorted(KEYS))
def test_checkpoint_names(name):
    keys = set(BUILDERS[name](num_classes=100).state_dict())
    missing = [k for k in KEYS[name] if k not in keys]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(KEY_COUNTS))
def test_state_dict_sizes(name):
    assert len(BUILDERS[name](num_classes=100).state_dict()) == KEY_COUNTS[name]


def test_a_saved_state_dict_loads_strictly_into_a_fresh_model(tmp_path):
    from kdrun.models.weights import load_weights

    src = BUILDERS["resnet8x4"](num_classes=100)
    torch.save({"model": src.state_dict(), "epoch": 240}, tmp_path / "ckpt_epoch_240.pth")
    dst = BUILDERS["resnet8x4"](num_classes=100)
    load_weights(dst, str(tmp_path / "ckpt_epoch_240.pth"), "teacher.checkpoint")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
