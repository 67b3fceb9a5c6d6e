"""Teacher outputs cached to disk (kdrun-cache, data.teacher_cache): the stored rows against the live
model, the cached divergence against the live one, refusals that name the field, the rows each DDP rank
reads, and the two commands end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdrun.errors import KdrunError
from kdrun.losses import CachedTokenDivergence, TokenDivergence
from tests.conftest import compose_cfg, run_cli

BASE = ["trainer.device=cpu", "trainer.progress=off", "trainer.tensorboard=false"]


def _cfg(extra=()):
    from kdrun.config import validate

    return validate(compose_cfg([*BASE, *extra], recipe="synthetic_tokens_kd"))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A random teacher's weights on disk (the cache checks them)."""
    from kdrun.build import build

    torch.manual_seed(0)
    exp = build(_cfg())
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": exp.models["teacher"].state_dict()}, path)
    return str(path)


def _write(tmp_path, ckpt, k=8, dtype="float32", extra=()):
    from kdrun.cache import write_cache

    out = tmp_path / f"cache_k{k}_{dtype}"
    return out, write_cache(_cfg([f"teacher.checkpoint={ckpt}", *extra]), "teacher", out, k=k, dtype=dtype, mask_field="loss_mask")


def _student_and_teacher_batches(cfg, cache_dir):
    """(experiment with the cache attached, the first training batch, the live teacher's logits on it)."""
    from kdrun.build import build
    from kdrun.data.loaders import make_loader

    cfg.data.teacher_cache = str(cache_dir)
    exp = build(cfg)
    loader = make_loader(exp.data, "train", cfg.data, exp.device, train=True, seed=0)
    loader.set_epoch(3)
    batch = next(iter(loader))
    ns: dict = {}
    with torch.no_grad():
        exp.io["teacher"].run(exp.models["teacher"].eval(), batch, ns)
    return exp, batch, ns["teacher.logits"]


def test_the_cache_holds_the_live_top_k_of_every_scored_token(tmp_path, teacher_ckpt):
    from kdrun.data.teacher_cache import TeacherCache

    out, info = _write(tmp_path, teacher_ckpt, k=8, dtype="float32")
    cache = TeacherCache(out)
    assert isinstance(cache.ids, np.memmap) and cache.k == 8
    assert abs(info["bytes"] / info["tokens"] - (8 * (4 + 4) + 4 + 2)) < 1  # ids, float32 logp, tail, int16 positions (+ npy headers)
    cfg = _cfg([f"teacher.checkpoint={teacher_ckpt}"])
    exp, batch, live = _student_and_teacher_batches(cfg, out)
    mask = batch["loss_mask"] != 0
    lp = torch.log_softmax(live.float(), -1)
    top = lp.topk(8, -1)
    assert torch.equal(batch["cache_ids"][mask], top.indices[mask])
    torch.testing.assert_close(batch["cache_logp"][mask], top.values[mask])
    tail = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(batch["cache_tail"][mask], tail[mask], atol=1e-5, rtol=1e-5)
    assert float(batch["cache_logp"][~mask].abs().sum()) == 0  # nothing stored where nothing is scored


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "srkl", "tvd"])
def test_the_cached_divergence_is_the_live_top_k_divergence(tmp_path, teacher_ckpt, kind):
    out, _ = _write(tmp_path, teacher_ckpt, k=8, dtype="float32")
    _, batch, live = _student_and_teacher_batches(_cfg([f"teacher.checkpoint={teacher_ckpt}"]), out)
    torch.manual_seed(1)
    student = torch.randn(live.shape, requires_grad=True)
    cached = CachedTokenDivergence(kind=kind)(student, batch["cache_ids"], batch["cache_logp"], batch["cache_tail"],
                                               batch["loss_mask"])
    want = TokenDivergence(kind=kind, top_k=8)(student, live, batch["loss_mask"])
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(cached, student)
    g2, = torch.autograd.grad(want, student)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


def test_a_full_vocabulary_cache_gives_the_full_divergence_and_float16_rounds(tmp_path, teacher_ckpt):
    out, _ = _write(tmp_path, teacher_ckpt, k=32, dtype="float32")  # synthetic_tokens: a 32-token vocabulary
    _, batch, live = _student_and_teacher_batches(_cfg([f"teacher.checkpoint={teacher_ckpt}"]), out)
    student = torch.randn(live.shape)
    full = TokenDivergence(kind="fkl")(student, live, batch["loss_mask"])
    args = (batch["cache_ids"], batch["cache_logp"], batch["cache_tail"], batch["loss_mask"])
    torch.testing.assert_close(CachedTokenDivergence()(student, *args), full, rtol=1e-5, atol=1e-6)
    out16, _ = _write(tmp_path, teacher_ckpt, k=32, dtype="float16")
    _, batch16, _ = _student_and_teacher_batches(_cfg([f"teacher.checkpoint={teacher_ckpt}"]), out16)
    args16 = (batch16["cache_ids"], batch16["cache_logp"], batch16["cache_tail"], batch16["loss_mask"])
    torch.testing.assert_close(CachedTokenDivergence()(student, *args16), full, rtol=2e-3, atol=2e-3)


def test_a_cache_that_does_not_match_the_run_is_refused_naming_the_field(tmp_path, teacher_ckpt):
    from kdrun.build import load_data

    out, _ = _write(tmp_path, teacher_ckpt, k=4)
    with pytest.raises(KdrunError, match="dataset_sha256"):
        load_data(_cfg([f"data.teacher_cache={out}", "data.source.seq_len=12"]))
    other = tmp_path / "other.pt"
    state = torch.load(teacher_ckpt, weights_only=True)
    state["model"] = {k: v + 1 for k, v in state["model"].items()}
    torch.save(state, other)
    with pytest.raises(KdrunError, match="teacher checkpoint"):
        load_data(_cfg([f"data.teacher_cache={out}", f"teacher.checkpoint={other}"]))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdrunError, match="tokenizer_sha256"):
        load_data(_cfg([f"data.teacher_cache={out}"]))
    (out / "manifest.json").unlink()
    with pytest.raises(KdrunError, match="holds no manifest.json"):
        load_data(_cfg([f"data.teacher_cache={out}"]))
    with pytest.raises(KdrunError, match="token data sets"):
        load_data(compose_cfg([*BASE, "data=synthetic", f"data.teacher_cache={tmp_path}"], recipe="quickstart"))


def test_each_rank_reads_the_rows_of_its_own_shard(tmp_path, teacher_ckpt):
    from kdrun.build import load_data
    from kdrun.data.loaders import make_loader

    out, _ = _write(tmp_path, teacher_ckpt, k=4)
    cfg = _cfg([f"data.teacher_cache={out}"])
    data = load_data(cfg)
    whole = make_loader(data, "train", cfg.data, torch.device("cpu"), train=True, seed=0)
    whole.set_epoch(5)
    ref = next(iter(whole))
    parts = []
    for rank in (0, 1):
        shard = make_loader(data, "train", cfg.data, torch.device("cpu"), train=True, seed=0, rank=rank, world_size=2)
        shard.set_epoch(5)
        parts.append(next(iter(shard)))
    for key in ("index", "cache_ids", "cache_logp", "cache_tail"):
        assert torch.equal(torch.cat([p[key] for p in parts]), ref[key]), key


def test_the_two_commands_end_to_end(tmp_path, teacher_ckpt):
    cache = tmp_path / "cli_cache"
    done = run_cli_cache(["--model", "teacher", "--top-k", "8", "--mask", "loss_mask", "--out", str(cache),
                          "+recipe=synthetic_tokens_kd", f"teacher.checkpoint={teacher_ckpt}", "trainer.device=cpu"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bytes per token" in done.stdout and (cache / "manifest.json").is_file() and not (tmp_path / "cli_cache.tmp").exists()
    loss = ("'+loss.kd={_target_: kdrun.losses.CachedTokenDivergence, inputs: {student: student.logits, ids: batch.cache_ids, "
            "logp: batch.cache_logp, tail: batch.cache_tail, mask: batch.loss_mask}}'")
    run = run_cli(["+recipe=synthetic_tokens_kd", *BASE, f"data.teacher_cache={cache}",
                   "stages.distill.max_steps=2", "~stages.teacher", "stages.distill.losses=[kd]", "~loss.kd", loss.strip("'"),
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and "teacher" not in summary.get("frozen_top1", {})


def run_cli_cache(args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "kdrun.cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
