"""The CIFAR zoo of the CRD/DKD benchmark: parameter counts, output shapes, standard taps (declared,
resolvable, hooked shapes, relations to each other and to the logits), checkpoint-compatible
parameter/buffer names and state-dict sizes, and the model configs.

Reference facts (names, shapes, counts) come from the model definitions of RepDistiller
(github.com/HobbitLong/RepDistiller, models/) and mdistiller (megvii-research/mdistiller,
mdistiller/models/cifar), whose names are identical.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from kdrun.models import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from kdrun.models.zoo import register_model, zoo

# the CIFAR benchmark zoo: every registered builder of these modules
CIFAR_MODULES = (resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2)
BUILDERS = {n: e.builder for n, e in zoo().items() if e.builder.__module__ in {m.__name__ for m in CIFAR_MODULES}}
NAMES = sorted(BUILDERS)

# Millions of parameters with 100 classes, to 3 decimals: the benchmark's published numbers ...
PARAMS = {"resnet20": 0.278, "resnet56": 0.862, "resnet110": 1.737, "resnet8x4": 1.234, "resnet32x4": 7.434,
          "wrn_16_2": 0.703, "wrn_40_1": 0.570, "wrn_40_2": 2.255, "vgg8": 3.965, "vgg13": 9.462, "resnet50": 23.705,
          "mobilenetv2": 0.813, "shufflenetv1": 0.949, "shufflenetv2": 1.356}
# ... and, for the other builders, counted by instantiating the reference definitions.
PARAMS_REFERENCE = {"resnet8": 0.084, "resnet14": 0.181, "resnet32": 0.473, "resnet44": 0.667, "wrn_16_1": 0.181,
                    "vgg11": 9.277, "vgg16": 14.774, "vgg19": 20.087}


def _shapes(stem: tuple[int, int], stages: list[tuple[int, int]], feat: int) -> dict[str, tuple[int, ...]]:
    """Expected tap shapes for a batch of 2 from (channels, side) of the stem and of each stage."""
    out = {"stem": (2, stem[0], stem[1], stem[1]), "feat": (2, feat)}
    for k, (c, s) in enumerate(stages, start=1):
        out[f"stage{k}"] = out[f"stage{k}_pre"] = (2, c, s, s)
    return out


def _cifar_resnet(w: tuple[int, int, int, int]) -> dict[str, tuple[int, ...]]:
    return _shapes((w[0], 32), [(w[1], 32), (w[2], 16), (w[3], 8)], w[3])


def _wrn(k: int) -> dict[str, tuple[int, ...]]:
    return _shapes((16, 32), [(16 * k, 32), (32 * k, 16), (64 * k, 8)], 64 * k)


# tap name -> shape for a 2x3x32x32 input
SHAPES = {
    **{n: _cifar_resnet((16, 16, 32, 64)) for n in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                                                    "resnet56", "resnet110")},
    **{n: _cifar_resnet((32, 64, 128, 256)) for n in ("resnet8x4", "resnet32x4")},
    "resnet50": _shapes((64, 32), [(256, 32), (512, 16), (1024, 8), (2048, 4)], 2048),
    "wrn_16_1": _wrn(1), "wrn_40_1": _wrn(1), "wrn_16_2": _wrn(2), "wrn_40_2": _wrn(2),
    # block 0 is the stem; the max-pool after block 3 only acts on 64x64 inputs
    **{n: _shapes((64, 32), [(128, 16), (256, 8), (512, 4), (512, 4)], 512)
       for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    # stride-2 stem; stages = groups 1, 2, 4, 6; the head is 1280-d
    "mobilenetv2": _shapes((16, 16), [(12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "shufflenetv1": _shapes((24, 32), [(240, 16), (480, 8), (960, 4)], 960),
    "shufflenetv2": _shapes((24, 32), [(116, 16), (232, 8), (464, 4)], 1024),
}

# the classifier fed by the ``feat`` tap
HEAD = {n: "fc" for n in BUILDERS if n.startswith(("resnet", "wrn"))}
HEAD.update({n: "classifier" for n in BUILDERS if n.startswith("vgg")})
HEAD.update(resnet50="linear", mobilenetv2="classifier", shufflenetv1="linear", shufflenetv2="linear")

# how stage<k>_pre relates to stage<k>: ReLU(pre) == stage, except where noted
RELATION = {n: "relu" for n in BUILDERS}
RELATION.update({n: "bn" for n in BUILDERS if n.startswith("wrn")})  # pre == the next BatchNorm(stage)
RELATION.update(mobilenetv2="same", shufflenetv2="shuffle_relu")  # linear blocks; pre is taken before the shuffle

# A sample of the reference's state-dict names with their shapes (100 classes) ...
KEYS = {
    "resnet56": {"conv1.weight": (16, 3, 3, 3), "bn1.running_mean": (16,), "layer1.0.conv1.weight": (16, 16, 3, 3),
                 "layer1.0.bn2.num_batches_tracked": (), "layer2.0.downsample.0.weight": (32, 16, 1, 1),
                 "layer2.0.downsample.1.running_var": (32,), "layer3.8.conv2.weight": (64, 64, 3, 3),
                 "fc.weight": (100, 64), "fc.bias": (100,)},
    "resnet8x4": {"conv1.weight": (32, 3, 3, 3), "layer1.0.conv1.weight": (64, 32, 3, 3),
                  "layer1.0.downsample.0.weight": (64, 32, 1, 1), "layer3.0.bn2.running_var": (256,),
                  "fc.weight": (100, 256)},
    "resnet50": {"conv1.weight": (64, 3, 3, 3), "bn1.weight": (64,), "layer1.0.conv3.weight": (256, 64, 1, 1),
                 "layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer1.0.shortcut.1.running_mean": (256,),
                 "layer4.2.bn3.weight": (2048,), "linear.weight": (100, 2048)},
    "wrn_40_2": {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,),
                 "block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block1.layer.5.conv2.weight": (32, 32, 3, 3),
                 "block3.layer.0.convShortcut.weight": (128, 64, 1, 1), "bn1.running_var": (128,),
                 "fc.weight": (100, 128)},
    "wrn_16_1": {"block1.layer.0.conv1.weight": (16, 16, 3, 3), "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
                 "fc.weight": (100, 64)},
    "vgg13": {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.running_mean": (64,),
              "block0.3.weight": (64, 64, 3, 3), "block0.4.num_batches_tracked": (), "block4.4.weight": (512,),
              "classifier.weight": (100, 512)},
    "vgg8": {"block0.0.weight": (64, 3, 3, 3), "block0.1.weight": (64,), "block4.0.weight": (512, 512, 3, 3),
             "classifier.bias": (100,)},
    "mobilenetv2": {"conv1.0.weight": (16, 3, 3, 3), "conv1.1.running_var": (16,),
                    "blocks.0.0.conv.0.weight": (16, 16, 1, 1), "blocks.1.1.conv.3.weight": (72, 1, 3, 3),
                    "blocks.6.0.conv.7.running_mean": (160,), "conv2.0.weight": (1280, 160, 1, 1),
                    "classifier.0.weight": (100, 1280)},
    "shufflenetv1": {"conv1.weight": (24, 3, 1, 1), "bn1.weight": (24,), "layer1.0.conv1.weight": (54, 24, 1, 1),
                     "layer1.0.conv3.weight": (216, 18, 1, 1), "layer1.0.bn3.running_var": (216,),
                     "layer2.1.conv1.weight": (120, 160, 1, 1), "layer3.3.conv3.weight": (960, 80, 1, 1),
                     "linear.weight": (100, 960)},
    "shufflenetv2": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (24, 1, 3, 3),
                     "layer1.0.bn5.weight": (58,), "layer1.3.conv3.weight": (58, 58, 1, 1),
                     "layer2.7.bn3.running_mean": (116,), "conv2.weight": (1024, 464, 1, 1),
                     "bn2.running_mean": (1024,), "linear.bias": (100,)},
}
# ... and names the reference does not have (identity shortcuts carry no weights).
ABSENT = {
    "resnet56": ["layer1.0.downsample.0.weight", "layer2.1.downsample.0.weight"],
    "resnet50": ["layer1.1.shortcut.0.weight"],
    "wrn_16_1": ["block1.layer.0.convShortcut.weight", "block2.layer.1.convShortcut.weight"],
    "vgg8": ["block0.3.weight"],
    "shufflenetv1": ["layer1.1.shortcut.0.weight"],
}
# len(state_dict()) of the reference models (conv 1 entry, +1 with bias; BatchNorm 5; linear 2),
# counted by instantiating the reference definitions. E.g. resnet20: stem 1 + 5, 9 blocks of 2 x (1 + 5),
# projections (1 + 5) in stages 2 and 3, fc 2 -> 6 + 108 + 12 + 2 = 128.
STATE_DICT_SIZES = {
    "resnet8": 56, "resnet14": 92, "resnet20": 128, "resnet32": 200, "resnet44": 272, "resnet56": 344,
    "resnet110": 668, "resnet8x4": 62, "resnet32x4": 206, "resnet50": 320,
    "wrn_16_1": 82, "wrn_16_2": 83, "wrn_40_1": 226, "wrn_40_2": 227,
    "vgg8": 37, "vgg11": 58, "vgg13": 72, "vgg16": 93, "vgg19": 114,
    "mobilenetv2": 320, "shufflenetv1": 296, "shufflenetv2": 338,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-2 forwards gain nothing from intra-op threads, and busy-waiting threads crawl on a loaded
    2-core machine, so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _model(name: str) -> nn.Module:
    """One shared instance per builder (100 classes, eval mode); tests must not modify it."""
    return BUILDERS[name](num_classes=100).eval()


@functools.cache
def _run(name: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and every declared tap's output, recorded with forward hooks, for a fixed 2x3x32x32 input."""
    model = _model(name)
    outputs: dict[str, Tensor] = {}

    def recorder(tap: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            outputs[tap] = output
        return hook

    handles = [model.get_submodule(path).register_forward_hook(recorder(tap)) for tap, path in model.taps.items()]
    try:
        with torch.no_grad():
            logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


def _standard_taps(name: str) -> set[str]:
    k = sum(1 for t in SHAPES[name] if t.startswith("stage") and not t.endswith("_pre"))
    return {"stem", "feat"} | {f"stage{i}" for i in range(1, k + 1)} | {f"stage{i}_pre" for i in range(1, k + 1)}


def test_every_builder_is_covered():
    assert set(SHAPES) == set(HEAD) == set(STATE_DICT_SIZES) == set(BUILDERS)
    assert set(PARAMS) | set(PARAMS_REFERENCE) == set(BUILDERS)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    millions = sum(p.numel() for p in _model(name).parameters()) / 1e6
    assert round(millions, 3) == {**PARAMS, **PARAMS_REFERENCE}[name], millions


@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name):
    logits, _ = _run(name)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["resnet8", "resnet50", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1",
                                  "shufflenetv2"])
def test_num_classes(name):
    model = BUILDERS[name](num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_standard_taps_are_declared_and_resolve(name):
    model = _model(name)
    assert isinstance(model.taps, dict)
    assert set(model.taps) == _standard_taps(name)
    for tap, path in model.taps.items():
        assert isinstance(path, str)
        module = model.get_submodule(path)  # raises if the path does not exist
        assert path in dict(model.named_modules()), (tap, path)
        assert module is not model


@pytest.mark.parametrize("name", NAMES)
def test_hooked_tap_shapes(name):
    _, outputs = _run(name)
    assert set(outputs) == set(_model(name).taps), "a tap's module did not run in forward"
    got = {tap: tuple(t.shape) for tap, t in outputs.items()}
    assert got == SHAPES[name]


@pytest.mark.parametrize("name", NAMES)
def test_feat_feeds_the_classifier(name):
    logits, outputs = _run(name)
    head = _model(name).get_submodule(HEAD[name])
    with torch.no_grad():
        assert torch.allclose(head(outputs["feat"]), logits, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_stage_and_preactivation_taps(name):
    model, (_, outputs) = _model(name), _run(name)
    stages = sorted(t for t in outputs if t.startswith("stage") and not t.endswith("_pre"))
    for stage in stages:
        out, pre = outputs[stage], outputs[f"{stage}_pre"]
        relation = RELATION[name]
        if relation == "relu":  # the stage output is the ReLU of the residual sum
            assert (out >= 0).all() and torch.equal(out, torch.relu(pre))
            assert (pre < 0).any()
        elif relation == "shuffle_relu":  # ShuffleNetV2: pre is the concatenation before the shuffle
            n, c, h, w = pre.shape
            shuffled = torch.relu(pre).reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            assert torch.equal(out, shuffled)
        elif relation == "bn":  # WRN: pre is the stage output through the BatchNorm that follows it
            with torch.no_grad():
                assert torch.allclose(pre, model.get_submodule(model.taps[f"{stage}_pre"])(out))
            assert (out < 0).any()  # pre-activation blocks: no ReLU at the end of a stage
        else:  # MobileNetV2: linear bottlenecks, the reference's preact features are the features
            assert pre is out


@pytest.mark.parametrize("name", sorted(KEYS))
def test_checkpoint_names_and_shapes(name):
    state = _model(name).state_dict()
    assert {k: tuple(state[k].shape) for k in KEYS[name] if k in state} == KEYS[name]
    assert not [k for k in ABSENT.get(name, []) if k in state]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_size(name):
    assert len(_model(name).state_dict()) == STATE_DICT_SIZES[name]


def test_the_benchmark_zoo_is_complete():
    assert NAMES == sorted(["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                            "resnet8x4", "resnet32x4", "resnet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
                            "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2"])


@pytest.mark.parametrize("name", sorted(zoo()))
def test_every_registered_model_is_a_config_group_option(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import compose_cfg

    cfg = compose_cfg([f"student={name}", "data=synthetic", "data.num_classes=7"], recipe=None)
    entry = zoo()[name]
    assert cfg.student.name == name and cfg.student.net._target_ == entry.target and cfg.student.checkpoint is None
    assert entry.doc and not entry.doc.startswith(name + "(")  # a description, not a signature
    net = instantiate(OmegaConf.to_container(cfg.student.net, resolve=True))
    assert type(net) is type(entry.builder(num_classes=7, **{k: v for k, v in entry.config.items() if "${" not in str(v)}))


def test_a_name_registered_twice_is_refused():
    def resnet20(num_classes: int = 100) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="registered twice"):
        register_model(resnet20)


def test_a_saved_state_dict_loads_strictly_into_a_fresh_model(tmp_path):
    from kdrun.models.weights import load_weights

    src = BUILDERS["resnet8x4"](num_classes=100)
    torch.save({"model": src.state_dict(), "epoch": 240}, tmp_path / "ckpt_epoch_240.pth")
    dst = BUILDERS["resnet8x4"](num_classes=100)
    load_weights(dst, str(tmp_path / "ckpt_epoch_240.pth"), "teacher.checkpoint")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
