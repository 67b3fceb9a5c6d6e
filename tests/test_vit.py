"""The CIFAR ViT: output shape, taps at the declared module paths, parameter counts, configs."""
from __future__ import annotations


import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.models.vit import VisionTransformer, vit_small, vit_tiny
from kdrun.taps import tap_groups
from kdrun.component import BuildContext


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (thread wake-ups dominate on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def expected_params(dim, depth, mlp_hidden, num_classes=100, patch=4, in_chans=3, tokens=64):
    """Parameter count written out: patch embedding, class token, positions, blocks, final norm, head."""
    block = (3 * dim * dim + 3 * dim) + (dim * dim + dim)  # qkv, attention projection
    block += (dim * mlp_hidden + mlp_hidden) + (mlp_hidden * dim + dim)  # MLP
    block += 2 * 2 * dim  # two LayerNorms
    return (in_chans * patch * patch * dim + dim) + dim + (tokens + 1) * dim + depth * block + 2 * dim \
        + dim * num_classes + num_classes


def _n(model):
    return sum(p.numel() for p in model.parameters())


def test_vit_tiny_has_4_045_540_parameters():
    assert _n(vit_tiny(100)) == expected_params(192, 9, 768) == 4_045_540


def test_vit_small_has_6_303_460_parameters():
    assert _n(vit_small(100)) == expected_params(384, 7, 384) == 6_303_460


def _small_vit(**kw):
    cfg = dict(num_classes=10, dim=16, depth=6, num_heads=2, mlp_ratio=2.0)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _capture(model, x):
    """Run ``model`` with forward hooks at its ``taps`` paths; return the logits and the tapped tensors."""
    got, handles = {}, []
    for name, path in model.taps.items():
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o)))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, got


@pytest.mark.parametrize("build", [vit_tiny, vit_small])
def test_output_and_tap_shapes(build):
    model = build(100).eval()
    d = model.head.in_features
    with torch.no_grad():
        out, taps = _capture(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert set(taps) == {"stem", "stage1", "stage2", "stage3", "tokens", "feat"}
    for name in ("stem", "stage1", "stage2", "stage3", "tokens"):
        assert taps[name].shape == (2, 64, d), name
    assert taps["feat"].shape == (2, d)
    assert torch.allclose(model.head(taps["feat"]), out)


def test_taps_are_the_right_tensors():
    model = _small_vit().eval()
    assert model.stage_blocks == [1, 3, 5]  # equal depth fractions of 6 blocks
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, taps = _capture(model, x)
        # recompute by hand
        h = model.patch_embed(x)
        assert torch.equal(h, taps["stem"])
        h = torch.cat([model.cls_token.expand(3, -1, -1), h], dim=1) + model.pos_embed
        for i, block in enumerate(model.blocks):
            h = block(h)
            if i in model.stage_blocks:
                assert torch.equal(h[:, 1:], taps[f"stage{model.stage_blocks.index(i) + 1}"])
        h = model.norm(h)
        assert torch.equal(h[:, 1:], taps["tokens"])  # after the final norm, class token removed
        assert torch.equal(h[:, 0], taps["feat"])


def test_mean_pooling_and_tap_groups():
    model = _small_vit(pool="mean", num_stages=2).eval()
    with torch.no_grad():
        out, taps = _capture(model, torch.randn(2, 3, 32, 32))
    assert torch.allclose(taps["feat"], taps["tokens"].mean(dim=1))
    groups = tap_groups(model.taps)
    assert groups["stages"] == ["stage1", "stage2"] and groups["last_stage"] == "stage2"
    assert groups["features"] == ["stem", "stage1", "stage2"]


def test_trains_with_drop_path_and_dropout():
    model = _small_vit(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2).train()
    x = torch.randn(4, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no randomness in eval mode


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(dim=10, num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer(pool="max")


@pytest.mark.parametrize("name,params", [("vit_tiny", 4_045_540), ("vit_small", 6_303_460)])
def test_model_configs_instantiate(name, params):
    from kdrun.registry import model_node

    cfg = OmegaConf.merge(OmegaConf.create({"data": {"num_classes": 100}}), {"model": model_node(name)})
    assert cfg.model.name == name and cfg.model.checkpoint is None
    net = instantiate(cfg.model.net)
    assert isinstance(net, VisionTransformer) and _n(net) == params


def test_kdrun_tap_recorder_feeds_trg_from_a_cnn_teacher():
    from kdrun.losses.trg import TRGLoss
    from kdrun.models.simple import simple_cnn
    from kdrun.taps import TapRecorder, declared_taps

    student = _small_vit()
    teacher = simple_cnn(num_classes=10, width=8, depth=3).eval()  # last stage: (B, 32, 8, 8)
    rs = TapRecorder(student, "student", declared_taps(student), {"tokens"})
    rt = TapRecorder(teacher, "teacher", declared_taps(teacher), {"stage3"})
    x = torch.randn(2, 3, 32, 32)
    student(x)
    with torch.no_grad():
        teacher(x)
    s, t = rs.pop()["tokens"], rt.pop()["stage3"]
    assert s.shape == (2, 64, 16) and t.shape == (2, 32, 8, 8)
    trg = TRGLoss(k=4)
    trg.setup(BuildContext(shapes={"student": s.shape, "teacher": t.shape}, num_train=100))
    trg.check_shapes(s.shape, t.shape)
    sum(trg(s, t).values()).backward()
    assert student.patch_embed.proj.weight.grad is not None
    rs.remove()
    rt.remove()
