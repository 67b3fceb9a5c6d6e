"""FIRST: expected calibration error, the temperature fitted to a top-K cache, and the divergence over the
renormalised top-K support."""
from __future__ import annotations

import json

import pytest
import torch

from kdrun.cache import calibrate_top_k
from kdrun.engine.evaluate import calibration_bins, ece_of
from kdrun.losses import CachedTokenDivergence


def _ece_loop(conf, right, bins=15):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = [(c, r) for c, r in zip(conf, right) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if sel:
            acc = sum(r for _, r in sel) / len(sel)
            avg = sum(c for c, _ in sel) / len(sel)
            total += len(sel) / len(conf) * abs(acc - avg)
    return 100.0 * total


def test_ece_against_the_definition():
    torch.manual_seed(0)
    logits, y = torch.randn(300, 7) * 2, torch.randint(0, 7, (300,))
    mask = torch.rand(300) > 0.2
    conf, pred = logits.softmax(-1).max(-1)
    keep = mask.nonzero().view(-1).tolist()
    want = _ece_loop([float(conf[i]) for i in keep], [float(pred[i] == y[i]) for i in keep])
    assert ece_of(calibration_bins(logits, y, mask)) == pytest.approx(want, abs=1e-9)


def test_calibration_picks_the_temperature_of_least_ece():
    torch.manual_seed(1)
    # an over-confident teacher: sharp top-5 distributions, right 40% of the time
    lp = torch.log_softmax(torch.randn(4000, 5) * 4, -1).sort(-1, descending=True).values
    right = torch.rand(4000) < 0.4
    cal = calibrate_top_k(lp, right)
    assert cal["temperature"] > 1.0 and cal["ece_after"] < cal["ece_before"]
    for tau in (1.0, cal["temperature"]):  # the reported values are the definition's at those temperatures
        conf = torch.softmax(lp / tau, -1)[:, 0]
        e = _ece_loop(conf.tolist(), right.double().tolist())
        assert e == pytest.approx(cal["ece_before"] if tau == 1.0 else cal["ece_after"], abs=1e-6)
        assert e >= cal["ece_after"] - 1e-6


def test_top_k_support_is_the_kl_between_renormalised_top_k_distributions(tmp_path):
    torch.manual_seed(2)
    zs, zt = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    lt = torch.log_softmax(zt, -1)
    logp, ids = lt.topk(4, -1)
    tail = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    (tmp_path / "manifest.json").write_text(json.dumps({"calibration": {"temperature": 1.7}}))
    term = CachedTokenDivergence(support="top_k", teacher_temperature="calibrated", cache=str(tmp_path))
    assert term.teacher_temperature == 1.7
    p = torch.softmax(logp / 1.7, -1)
    q = torch.softmax(torch.log_softmax(zs, -1).gather(-1, ids), -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(term(zs, ids, logp, tail, mask), want, atol=1e-6)


def test_a_calibrated_temperature_needs_a_calibrated_cache(tmp_path):
    with pytest.raises(ValueError, match="cache=\\$\\{data.teacher_cache\\}"):
        CachedTokenDivergence(support="top_k", teacher_temperature="calibrated")
    (tmp_path / "manifest.json").write_text(json.dumps({"k": 5}))
    with pytest.raises(ValueError, match="--calibrate"):
        CachedTokenDivergence(support="top_k", teacher_temperature="calibrated", cache=str(tmp_path))
    with pytest.raises(ValueError, match="support=top_k"):
        CachedTokenDivergence(teacher_temperature=2.0)


def test_kdrun_cache_calibrate_writes_the_temperature(tmp_path):
    from kdrun.cache import write_cache
    from kdrun.config import validate
    from tests.conftest import compose_cfg

    torch.manual_seed(0)
    cfg = validate(compose_cfg(["trainer.device=cpu", "data.source.max_train_blocks=8", "data.source.max_test_blocks=4"],
                               recipe="text_quickstart"))
    info = write_cache(cfg, "teacher", tmp_path / "c", k=5, calibrate=True)
    cal = json.loads((tmp_path / "c" / "manifest.json").read_text())["calibration"]
    assert cal == info["calibration"] and cal["split"] == "test" and cal["tokens"] == 4 * 64
    assert 0.5 <= cal["temperature"] <= 3.0 and cal["ece_after"] <= cal["ece_before"]
