"""The command line, end to end, in a subprocess."""
import json
import shutil
import textwrap

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # subprocesses: deselect with -m 'not slow'

QUIET = ["trainer.progress=off", "trainer.tensorboard=false"]


def test_quickstart_with_no_arguments(tmp_path):
    exe = shutil.which("kdrun")
    assert exe, "the kdrun console script is not installed (pip install -e .)"
    import subprocess

    proc = subprocess.run([exe, f"hydra.run.dir={tmp_path / 'qs'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "teacher (frozen) test top-1" in out and "student test top-1" in out and "run directory" in out
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["frozen_top1"]["teacher"] > 90 and summary["best_top1"] > 85
    assert (tmp_path / "qs" / "student.pt").is_file() and list((tmp_path / "qs" / "tb").iterdir())


def test_help_lists_groups_and_recipes(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0
    for word in ("recipe:", "cifar100_kd", "cifar100_baseline", "quickstart", "teacher:", "student:", "data:", "cnn_small"):
        assert word in proc.stdout, word


def test_user_mistakes_exit_with_one_message(tmp_path):
    proc = run_cli(["+loss.kd.temprature=2", *QUIET], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Did you mean 'temperature'" in proc.stderr
    proc = run_cli(["trainer.max_epoch=2"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "max_epochs" in proc.stderr
    proc = run_cli(["+recipe=cifar100_kd", "teacher=cnn_small", "student=cnn_tiny", f"data.root={tmp_path}/none"], tmp_path)
    assert proc.returncode == 2 and "cifar100 not found" in proc.stderr and "Traceback" not in proc.stderr


def test_baseline_student_becomes_the_kd_teacher(tmp_path):
    synth = ["data=synthetic", "data.num_classes=100", "data.batch_size=32", "trainer.max_epochs=1", *QUIET]
    base = tmp_path / "base"
    proc = run_cli(["+recipe=cifar100_baseline", "student=cnn_small", f"hydra.run.dir={base}", *synth], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((base / "summary.json").read_text())["teacher"] is None
    kd = tmp_path / "kd"
    proc = run_cli(["+recipe=cifar100_kd", "teacher=cnn_small", "student=cnn_tiny", f"teacher.checkpoint={base}/student.pt",
                    f"hydra.run.dir={kd}", *synth], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((kd / "summary.json").read_text())
    base_summary = json.loads((base / "summary.json").read_text())
    assert summary["frozen_top1"]["teacher"] == pytest.approx(base_summary["last_top1"])
    assert summary["random_models"] == [] and summary["method"] == "KD"


def test_random_teacher_is_announced(tmp_path):
    proc = run_cli(["+recipe=cifar100_kd", "teacher=cnn_small", "student=cnn_tiny", "teacher.checkpoint=null", "data=synthetic",
                    "data.num_classes=100", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'r'}", *QUIET], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOMLY INITIALISED" in proc.stdout + proc.stderr


def test_user_recipe_folder_through_the_search_path(tmp_path):
    folder = tmp_path / "mine" / "recipe"
    folder.mkdir(parents=True)
    (folder / "tiny_kd.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - cifar100_kd
          - _self_
        name: tiny_kd
        loss:
          kd:
            temperature: 2
        """))
    proc = run_cli([f"hydra.searchpath=[file://{tmp_path / 'mine'}]", "+recipe=tiny_kd", "teacher=cnn_small", "student=cnn_tiny", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name: tiny_kd" in proc.stdout and "temperature: 2" in proc.stdout and "cnn_small" in proc.stdout


def test_torchvision_model_on_an_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / split / cls / f"{i}.png")
    proc = run_cli(["+recipe=cifar100_baseline", "data=imagenet", f"data.root={tmp_path / 'img'}", "data.num_classes=2",
                    "data.input_shape=[3,32,32]", "data.source.resize=36", "data.num_workers=0", "data.batch_size=4",
                    "student=tv_resnet18", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", *QUIET], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student"] == "tv_resnet18" and summary["steps"] == 2 and summary["last_top1"] is not None


def test_an_override_holding_an_interpolation_is_kept_as_typed_in_the_summary(tmp_path, fast_digits):
    """Overrides such as ``loss.kd.teacher_tokenizer=${data.source.teacher_tokenizer}`` (the cross-tokenizer
    stand-ins) used to crash the summary, after training, when the saved override list was resolved on its own."""
    proc = run_cli([*fast_digits, "trainer.max_epochs=1", "seed=${trainer.max_epochs}",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "seed=${trainer.max_epochs}" in summary["overrides"]
