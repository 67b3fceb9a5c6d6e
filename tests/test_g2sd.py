"""G2SD (Huang et al., CVPR 2023): the masked autoencoder's masking and position embeddings against MAE's
definitions, the two losses against their formulas, the batch transforms, and the engine's per-stage
batch transforms and ``init_weights`` in the two-stage recipe on tiny models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdrun.data.mix import CutMix, Mixup, MixupOrCutMix, PatchMaskNoise
from kdrun.errors import KdrunError
from kdrun.losses import HardDistillationLoss, SmoothL1FeatureLoss
from kdrun.models.mae import DistilledVisionTransformer, MaskedAutoencoder, sincos_pos_embed

TINY = dict(img_size=32, patch_size=8, dim=16, depth=2, num_heads=2, decoder_dim=12, decoder_depth=3, decoder_heads=2)


def test_sincos_embeddings_follow_maes_numpy_definition():
    dim, grid = 16, 4

    def one_axis(d, pos):  # MAE's get_1d_sincos_pos_embed_from_grid
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    want = np.concatenate([one_axis(dim // 2, g[0]), one_axis(dim // 2, g[1])], axis=1)
    want = np.concatenate([np.zeros((1, dim)), want], axis=0)
    torch.testing.assert_close(sincos_pos_embed(dim, grid)[0].double(), torch.from_numpy(want), atol=1e-6, rtol=0)


def test_the_same_noise_masks_two_models_identically_and_keeps_the_lowest_noise():
    torch.manual_seed(0)
    a, b = MaskedAutoencoder(**TINY), MaskedAutoencoder(**{**TINY, "dim": 24, "decoder_dim": 8})
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    oa, ob = a(x, noise), b(x, noise)
    assert torch.equal(oa["mask"], ob["mask"])
    keep = int(16 * (1 - 0.75))
    assert oa["mask"].sum(dim=1).tolist() == [16 - keep] * 3
    lowest = noise.argsort(dim=1)[:, :keep]
    assert (oa["mask"].gather(1, lowest) == 0).all()  # the visible patches are those with the lowest noise
    assert oa["decoder_hidden"].shape == (3, 17, 12) and oa["pixels"].shape == (3, 16, 8 * 8 * 3)
    assert not torch.equal(a(x, torch.rand(3, 16))["mask"], oa["mask"])


def test_a_truncated_decoder_returns_the_hidden_tokens_after_its_kth_block():
    torch.manual_seed(0)
    full = MaskedAutoencoder(**TINY).eval()
    cut = MaskedAutoencoder(**{**TINY, "decoder_layers_out": 2}).eval()
    cut.load_state_dict(full.state_dict())
    seen = {}
    full.decoder_blocks[1].register_forward_hook(lambda m, i, o: seen.update(h=o))
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    full(x, noise)
    out = cut(x, noise)
    torch.testing.assert_close(out["decoder_hidden"], seen["h"])
    assert "pixels" not in out  # the pixel head needs every block


def test_a_masked_autoencoder_refuses_noise_of_the_wrong_shape():
    with pytest.raises(ValueError, match="noise must be"):
        MaskedAutoencoder(**TINY)(torch.randn(2, 3, 32, 32), torch.rand(2, 15))


def test_the_distilled_vit_averages_its_two_heads_and_shares_the_maes_encoder_names():
    torch.manual_seed(0)
    vit = DistilledVisionTransformer(num_classes=5, img_size=32, patch_size=8, dim=16, depth=2, num_heads=2, num_stages=2)
    out = vit(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out["logits"], (out["cls_logits"] + out["dist_logits"]) / 2)
    mae = MaskedAutoencoder(**TINY).state_dict()
    own = vit.state_dict()
    shared = [k for k in own if k in mae]
    assert set(own) - set(shared) == {"dist_token", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert all(own[k].shape == mae[k].shape for k in shared)


def _smooth_l1(d, beta):
    a = d.abs()
    return torch.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)


def test_smooth_l1_feature_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g, dtype=torch.float64) * 3, torch.randn(3, 5, 8, generator=g, dtype=torch.float64) * 2
    t_norm = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
    want = _smooth_l1(s - t_norm, 2.0).mean()
    torch.testing.assert_close(SmoothL1FeatureLoss()(s, t), want)
    # only the removed patches (class token excluded): every sample removes the same number
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    per = _smooth_l1(s[:, 1:] - t_norm[:, 1:], 2.0).mean(-1)
    torch.testing.assert_close(SmoothL1FeatureLoss()(s, t, mask), (per * mask).sum() / mask.sum())
    torch.testing.assert_close(SmoothL1FeatureLoss(normalize_target=False, beta=1.0)(s, t), _smooth_l1(s - t, 1.0).mean())


def test_hard_distillation_is_the_cross_entropy_against_the_teachers_top1():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, 4, generator=g, requires_grad=True)
    loss = HardDistillationLoss()(s, t)
    want = -torch.log_softmax(s, dim=1)[torch.arange(6), t.argmax(1)].mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert t.grad is None or float(t.grad.abs().sum()) == 0.0


def test_mixup_or_cutmix_draws_one_and_smooths_its_targets():
    batch = {"input": torch.randn(8, 3, 8, 8), "target": torch.arange(8) % 5, "index": torch.arange(8)}
    t = MixupOrCutMix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
    kinds = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = t(batch)
        torch.manual_seed(seed)
        chosen = CutMix(5, 1.0) if bool(torch.rand(()) < 0.5) else Mixup(5, 0.8)
        ref = chosen(batch)
        kinds.add(type(chosen).__name__)
        torch.testing.assert_close(out["input"], ref["input"])
        torch.testing.assert_close(out["soft_target"], 0.9 * ref["soft_target"] + 0.1 / 5)
        torch.testing.assert_close(out["soft_target"].sum(1), torch.ones(8))
    assert kinds == {"CutMix", "Mixup"}


def test_mask_noise_has_a_column_per_patch_and_fixed_evaluation_draws():
    t = PatchMaskNoise(patch_size=8)
    batch = {"input": torch.randn(4, 3, 32, 16), "target": torch.zeros(4, dtype=torch.long)}
    assert t(batch)["mask_noise"].shape == (4, 8)
    assert torch.equal(t.for_eval(batch)["mask_noise"], t.for_eval(batch)["mask_noise"])
    state = torch.get_rng_state()
    t.for_eval(batch)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws nothing from the training generator
    with pytest.raises(ValueError, match="not divisible"):
        PatchMaskNoise(patch_size=5)(batch)


# ------------------------------------------------------------------------------ the recipe's two stages
def tiny_g2sd(extra: list[str] = ()) -> list[str]:
    mae = "img_size: 32, patch_size: 8, dim: 16, depth: 2, num_heads: 2, decoder_heads: 2"
    return ["data=synthetic", "data.num_classes=5", "data.input_shape=[3,32,32]", "data.batch_size=4",
            "data.eval_batch_size=4", "data.source.num_train=8", "data.source.num_test=4", "trainer.device=cpu",
            "trainer.progress=off", "trainer.tensorboard=false", "models.mae_teacher.checkpoint=null",
            "teacher.checkpoint=null",
            f"++models.mae_teacher.net={{{mae}, decoder_dim: 24, decoder_depth: 2, decoder_layers_out: 1}}",
            f"++models.mae_student.net={{{mae}, decoder_dim: 8, decoder_depth: 1}}",
            "++teacher.net={img_size: 32, patch_size: 8, dim: 24, depth: 2, num_heads: 2, num_stages: 2}",
            "++student.net={img_size: 32, patch_size: 8, dim: 16, depth: 2, num_heads: 2, num_stages: 2}",
            "stages.generic.epochs=1", "stages.specific.epochs=1", "stages.generic.batch_transform.patch_size=8",
            *extra]


def _trainer(tmp_path, extra=()):
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    trainer = Trainer(validate(compose_cfg(tiny_g2sd(list(extra)), recipe="imagenet_g2sd")), tmp_path)
    trainer.prepare()
    return trainer


def test_each_stage_runs_its_own_batch_transform(tmp_path):
    exp = _trainer(tmp_path).experiment
    generic, specific = exp.stages
    assert not isinstance(exp.batch_transform, (MixupOrCutMix, PatchMaskNoise))  # the run-wide one is not theirs
    assert isinstance(generic.batch_transform, PatchMaskNoise) and isinstance(specific.batch_transform, MixupOrCutMix)
    batch = {"input": torch.randn(2, 3, 32, 32), "target": torch.zeros(2, dtype=torch.long)}
    assert "mask_noise" in generic.eval_transform(batch)  # evaluation batches of the generic stage are masked too
    assert torch.equal(specific.eval_transform(batch)["input"], batch["input"])  # and those of the specific stage unmixed
    assert exp.shapes["mae_student.decoder_hidden"] == (2, 17, 8) and exp.shapes["adapters.decoder_pred"] == (2, 17, 24)
    assert exp.shapes["student.dist_logits"] == (2, 5)


def test_init_weights_copies_the_encoder_when_the_stage_starts_and_not_on_a_resume(tmp_path):
    trainer = _trainer(tmp_path)
    exp = trainer.experiment
    mae, vit = exp.models["mae_student"], exp.models["student"]
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(1.0)
    head = vit.head.weight.clone()
    runner = trainer.stage_runner(1)
    for k, v in vit.state_dict().items():
        if k in mae.state_dict():
            assert torch.equal(v, mae.state_dict()[k]), k
    assert torch.equal(vit.head.weight, head)  # the head keeps its initialisation
    # a resumed run inside the stage (its record holds the stage) keeps the student's own weights
    trainer.ctx.record.stages.setdefault(runner.key.label, {})
    with torch.no_grad():
        mae.blocks[0].attn.qkv.weight.add_(1.0)
    trainer.stage_runner(1)
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)


def test_init_weights_of_different_widths_is_refused_at_build(tmp_path):
    with pytest.raises(KdrunError, match=r"init_weights.student: student's .* is \(1, 1, 24\) but mae_student's"):
        _trainer(tmp_path, ["student.net.dim=24"])
    from kdrun.config import validate
    from tests.conftest import compose_cfg

    with pytest.raises(KdrunError, match="init_weights: no source 'mae'"):
        validate(compose_cfg(tiny_g2sd(["stages.specific.init_weights={student: mae}"]), recipe="imagenet_g2sd"))


def test_the_two_stage_recipe_trains_both_stages_and_the_generic_loss_falls(tmp_path):
    import json

    from kdrun.config import validate
    from kdrun.engine import run
    from tests.conftest import compose_cfg

    torch.manual_seed(0)
    cfg = validate(compose_cfg(tiny_g2sd(["stages.generic.epochs=4", "stages.generic.optimizer.lr=3e-3",
                                          "stages.generic.scheduler.warmup_ratio=0"]), recipe="imagenet_g2sd"))
    summary = run(cfg, tmp_path)
    assert summary["steps"] == 4 * 2 + 2 and summary["last_top1"] is not None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    generic = [r["loss/decoder_features"] for r in rows if r.get("stage") == "generic" and "epoch_time_s" in r]
    assert len(generic) == 4 and generic[-1] < generic[0]
    specific = [r for r in rows if r.get("stage") == "specific" and "loss/hard" in r]
    assert specific and all(math.isfinite(r["loss/ce"]) for r in specific)
