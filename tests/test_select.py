"""MiniPLM's difference sampling: the scores against a hand computation, the kept top fraction, and a run on the
selection (refused on other data)."""
from __future__ import annotations

import json

import pytest
import torch

from kdrun.config import validate
from kdrun.errors import KdrunError
from kdrun.select import keep_top, mean_nll, write_selection
from tests.conftest import compose_cfg

SMALL = ["trainer.device=cpu", "trainer.progress=off", "trainer.tensorboard=false", "trainer.save_checkpoints=false",
         "data.source.max_train_blocks=12", "data.source.max_test_blocks=2", "stages.teacher.max_steps=1",
         "stages.reference.max_steps=1", "stages.student.max_steps=1"]


def test_keep_top_takes_the_highest_scores_ties_by_index():
    s = torch.tensor([0.1, 0.9, 0.5, 0.9, -1.0, 0.5])
    assert keep_top(s, 0.5).tolist() == [1, 2, 3]  # 0.9, 0.9, then the first 0.5
    assert keep_top(s, 0.01).tolist() == [1]
    with pytest.raises(KdrunError, match="--keep"):
        keep_top(s, 0.0)


def test_scores_are_the_difference_of_mean_token_nlls(tmp_path):
    from kdrun.build import build

    torch.manual_seed(0)
    cfg = validate(compose_cfg(SMALL, recipe="text_miniplm"))
    info = write_selection(cfg, "teacher", "reference", tmp_path / "sel", keep=0.25)
    torch.manual_seed(0)  # the same random models again
    exp = build(cfg)
    f = exp.data.train
    want = []
    with torch.no_grad():
        for m in ("teacher", "reference"):
            z = exp.models[m].eval()(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
            want.append(torch.nn.functional.cross_entropy(z.transpose(1, 2), f["labels"], reduction="none").mean(1))
    scores = torch.from_numpy(__import__("numpy").load(tmp_path / "sel" / "scores.npy"))
    assert torch.allclose(scores, (want[1] - want[0]).float(), atol=1e-4)
    assert info["kept"] == keep_top(scores, 0.25).tolist() and info["kept_samples"] == 3
    assert torch.allclose(mean_nll(exp, cfg, "teacher").float(), want[0].float(), atol=1e-4)


def test_a_run_trains_on_the_kept_examples_and_refuses_other_data(tmp_path):
    from kdrun.build import load_data
    from kdrun.config import experiment_config

    torch.manual_seed(0)
    cfg = validate(compose_cfg(SMALL, recipe="text_miniplm"))
    info = write_selection(cfg, "teacher", "reference", tmp_path / "sel", keep=0.5)
    full = load_data(experiment_config(cfg))
    sel = validate(compose_cfg(SMALL + [f"data.selection={tmp_path / 'sel'}"], recipe="text_miniplm"))
    kept = load_data(experiment_config(sel))
    assert kept.num_train == 6 and torch.equal(kept.train["input_ids"], full.train["input_ids"][info["kept"]])
    assert torch.equal(kept.test["input_ids"], full.test["input_ids"])  # evaluation on the whole test split
    other = validate(compose_cfg(SMALL + [f"data.selection={tmp_path / 'sel'}", "data.source.max_train_blocks=10"],
                                 recipe="text_miniplm"))
    with pytest.raises(KdrunError, match="dataset_sha256"):
        load_data(experiment_config(other))
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["keep"] == 0.5


def test_kdrun_select_command(tmp_path):
    from tests.conftest import run_cli
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kdrun.select", "--keep", "0.5", "--out", str(tmp_path / "s"),
                          "+recipe=text_miniplm", *SMALL], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kept 6 of 12 examples" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "kdrun.select", "--reference", "nobody", "--out", str(tmp_path / "t"),
                          "+recipe=text_miniplm", *SMALL], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no model 'nobody'" in bad.stderr and "Traceback" not in bad.stderr
    assert run_cli is not None
