"""A non-editable install ships the configs and recipes and runs from any directory."""
import os
import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO
import pytest

pytestmark = pytest.mark.slow  # subprocesses: deselect with -m 'not slow'


def test_wheel_ships_configs_and_runs_from_elsewhere(tmp_path):
    src = tmp_path / "src"
    top_level_skip = {".git", "outputs", "multirun", "build", "tests", "docs", "data", "teachers"}

    def ignore(folder, names):
        skip = top_level_skip if os.path.samefile(folder, REPO) else set()
        return [n for n in names if n in skip or n == "__pycache__" or n.endswith(".egg-info")]

    shutil.copytree(REPO, src, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(wheels)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("kdrun-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("kdrun/configs/kdrun.yaml", "kdrun/configs/data/cifar100.yaml", "kdrun/configs/model/tv_resnet18.yaml",
                     "kdrun/models/zoo.py",
                     "kdrun/recipes/quickstart.yaml", "kdrun/recipes/cifar100_kd.yaml"):
        assert required in names, required
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import kdrun.paths as p; print(p.config_dir())"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target))
    proc = subprocess.run([sys.executable, "-m", "kdrun", "data.subset=128", "trainer.max_epochs=1", "trainer.progress=off",
                           "trainer.tensorboard=false"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outputs/quickstart" in proc.stdout and (elsewhere / "outputs" / "quickstart").is_dir()
