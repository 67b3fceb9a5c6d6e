"""``kdrun-report``: fake run directories written here (fast), and one real two-seed sweep end to end."""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kdrun import report

QUIET = ["trainer.progress=off", "trainer.tensorboard=false"]
PUB = {"source": "CRD (Tian et al., ICLR 2020)", "metric": "last", "top1": 73.33, "note": ""}


def write_run(run_dir: Path, *, seed: int, best: float, last: float, method: str = "KD", name: str = "cifar100_kd",
              data: str = "cifar100", teacher: str | None = "resnet32x4", student: str = "resnet8x4",
              overrides: list[str] | None = None, published: dict | None = None, shots: dict | None = None,
              curve: list[float] | None = None) -> dict:
    """A run directory the way kdrun writes one: summary.json, metrics.jsonl, .hydra/overrides.yaml."""
    overrides = [f"+recipe={name}", *(overrides or []), f"seed={seed}"]
    summary = {
        "name": name, "method": method, "data": data, "teacher": teacher, "student": student, "seed": seed,
        "eval_model": "student", "best_top1": best, "last_top1": last, "best_top5": best + 20, "last_top5": last + 20,
        "best_epoch": 2, "stages": {"main": {"eval_model": "student", "epochs": 3, "best_top1": best, "last_top1": last}},
        "frozen_top1": {"teacher": 79.4} if teacher else {}, "random_models": [],
        "params": {"student": 1000}, "wall_time_s": 10.0 + seed, "run_dir": str(run_dir), "overrides": overrides,
    }
    if published is not None:
        pub = dict(published)
        got = best if pub["metric"] == "best" else last
        summary["published"] = {**pub, "reproduced": got, "delta": got - pub["top1"]}
    if shots is not None:
        summary["shot_top1"] = shots
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    curve = curve or [best - 10, best, last]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for epoch, top1 in enumerate(curve, 1):
            f.write(json.dumps({"stage": "main", "epoch": epoch, "step": 10 * epoch, "loss/total": 1.0, "lr": 0.05}) + "\n")
            f.write(json.dumps({"stage": "main", "epoch": epoch, "step": 10 * epoch, "loss/total": 1.0, "loss/kd": 0.5,
                                "lr": 0.05, "epoch_time_s": 1.0, "images_per_s": 100.0, "top1": top1,
                                "top5": top1 + 20, "best_top1": max(curve[:epoch])}) + "\n")
    return summary


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table_rows(text: str) -> list[dict[str, str]]:
    """The markdown table's rows as dicts (header -> cell)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


@pytest.fixture()
def tree(tmp_path: Path) -> dict:
    """A sweep of KD (3 seeds, published number; job 3 failed, job 4 never started, job 5 empty), a
    baseline with 2 seeds, a KD run with a different lr, a long-tailed run, an incomplete run, an empty folder."""
    sweep = tmp_path / "multirun" / "kd"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  sweep:\n    dir: x\n    subdir: ${hydra.job.num}\n"
        "  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params: null\n"
        "  overrides:\n    hydra: [hydra.mode=MULTIRUN]\n    task: [+recipe=cifar100_kd, 'seed=0,1,2,3,4,5']\n")
    kd = [(71.9, 73.1), (72.4, 73.6), (72.0, 72.8)]
    summaries = {"kd": [write_run(sweep / str(i), seed=i, best=b, last=l, published=PUB,
                                  overrides=QUIET if i == 1 else [])  # output-only overrides do not split groups
                        for i, (b, l) in enumerate(kd)]}
    failed = sweep / "3"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- +recipe=cifar100_kd\n- seed=3\n")
    (failed / "FAILED").write_text("cifar100 not found under /data/cifar100\nsecond line\n")
    (sweep / "5").mkdir()

    runs = tmp_path / "outputs"
    summaries["base"] = [write_run(runs / f"base{s}", seed=s, best=b, last=l, method="baseline", name="cifar100_baseline",
                                   teacher=None, student="resnet8x4")
                         for s, (b, l) in enumerate([(70.1, 69.8), (70.9, 70.5)])]
    summaries["lr"] = [write_run(runs / "kd_lr", seed=0, best=70.0, last=69.5, published=PUB,
                                 overrides=["stages.main.optimizer.lr=0.1"])]
    shots = {"many": 68.2, "medium": 41.5, "few": 12.25}
    summaries["lt"] = [write_run(runs / "lt", seed=0, best=45.0, last=44.5, method="TRG", name="cifar100_lt_trg",
                                 data="cifar100_lt", shots=shots)]
    incomplete = runs / "killed"
    (incomplete / ".hydra").mkdir(parents=True)
    (incomplete / "metrics.jsonl").write_text(
        json.dumps({"stage": "main", "epoch": 1, "step": 5, "top1": 12.5}) + "\n" + '{"stage": "ma')
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"root": tmp_path, "sweep": sweep, "runs": runs, "empty": empty, "summaries": summaries}


def test_table_groups_and_numbers(tree, capsys):
    code = report.main([str(tree["sweep"]), str(tree["runs"]), str(tree["empty"])])
    out = capsys.readouterr().out
    assert code == 0
    rows = table_rows(out)
    assert len(rows) == 4, out
    by = {(r["method"], r["overrides"]): r for r in rows}
    s = tree["summaries"]

    kd = by[("KD", "—")]
    assert kd["n"] == "3" and kd["teacher"] == "resnet32x4" and kd["student"] == "resnet8x4"
    assert kd["best top-1"] == mean_std([x["best_top1"] for x in s["kd"]])
    assert kd["last top-1"] == mean_std([x["last_top1"] for x in s["kd"]])
    assert kd["published"] == "73.33 (last)"
    delta = statistics.fmean(x["last_top1"] for x in s["kd"]) - 73.33  # the published metric is "last"
    assert kd["Δ vs published"] == f"{delta:+.2f}"
    assert kd["many"] == kd["medium"] == kd["few"] == "—"

    lr = by[("KD", "stages.main.optimizer.lr=0.1")]  # a different override is a different group
    assert lr["n"] == "1" and lr["best top-1"] == "70.00" and lr["Δ vs published"] == f"{69.5 - 73.33:+.2f}"

    base = by[("baseline", "—")]
    assert base["n"] == "2" and base["teacher"] == "—" and base["published"] == "—" and base["Δ vs published"] == "—"
    assert base["best top-1"] == mean_std([x["best_top1"] for x in s["base"]])

    lt = by[("TRG", "—")]
    assert lt["data"] == "cifar100_lt" and (lt["many"], lt["medium"], lt["few"]) == ("68.20", "41.50", "12.25")

    problems = out.split("Not in the table", 1)[1]
    lines = [ln for ln in problems.splitlines() if ln.startswith("- ")]
    assert len(lines) == 5, problems
    text = "\n".join(lines)
    assert f"{tree['sweep'] / '3'}: failed [seed=3]: cifar100 not found under /data/cifar100" in text
    assert f"{tree['sweep'] / '4'}: missing [seed=4]: job 4 of 6 never started" in text
    assert f"{tree['sweep'] / '5'}: incomplete [seed=5]: empty job directory" in text
    assert f"{tree['runs'] / 'killed'}: incomplete: no summary.json" in text and "epoch 1" in text
    assert f"{tree['empty']}: no run found" in text


def test_group_runs_ignores_only_seed_and_output_keys(tree):
    runs, problems = report.find_runs([tree["root"]])
    assert len(runs) == 7 and len(problems) == 4  # failed, missing, empty job, killed; a stray empty folder is not a run
    groups = report.group_runs(runs)
    assert sorted(len(g.runs) for g in groups) == [1, 1, 2, 3]
    merged = report.group_runs(runs, ignore=["stages.main.optimizer.lr"])
    assert sorted(len(g.runs) for g in merged) == [1, 2, 4]


def test_csv_file_and_csv_format(tree, tmp_path, capsys):
    out_csv = tmp_path / "table.csv"
    assert report.main([str(tree["sweep"]), str(tree["runs"]), "--csv", str(out_csv)]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 4
    kd = next(r for r in rows if r["method"] == "KD" and r["n_seeds"] == "3")
    best = [x["best_top1"] for x in tree["summaries"]["kd"]]
    assert float(kd["best_top1_mean"]) == pytest.approx(statistics.fmean(best), abs=1e-4)
    assert float(kd["best_top1_std"]) == pytest.approx(statistics.stdev(best), abs=1e-4)
    assert kd["seeds"] == "0 1 2" and kd["published_metric"] == "last" and float(kd["published_top1"]) == 73.33
    last = [x["last_top1"] for x in tree["summaries"]["kd"]]
    assert float(kd["delta"]) == pytest.approx(statistics.fmean(last) - 73.33, abs=1e-4)
    lt = next(r for r in rows if r["method"] == "TRG")
    assert float(lt["few_mean"]) == 12.25 and lt["few_std"] == ""
    base = next(r for r in rows if r["method"] == "baseline")
    assert base["teacher"] == "" and base["delta"] == ""

    assert report.main([str(tree["sweep"]), str(tree["runs"]), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out == out_csv.read_text()  # stdout is the CSV alone; the failures go to stderr
    assert "failed [seed=3]" in captured.err


def test_plots_are_written(tree, tmp_path, capsys):
    plot, curves = tmp_path / "pub.png", tmp_path / "curves.png"
    assert report.main([str(tree["root"]), "--plot", str(plot), "--curves", str(curves)]) == 0
    for p in (plot, curves):
        assert p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nopub = tmp_path / "nopub.png"  # no published number at all: a bar chart instead
    assert report.main([str(tree["runs"] / "base0"), "--plot", str(nopub)]) == 0
    assert nopub.stat().st_size > 1000


def test_curves_average_over_seeds(tree):
    with open(tree["sweep"] / "0" / "metrics.jsonl", "a") as f:  # an earlier stage, a frozen eval, a resumed epoch
        f.write(json.dumps({"stage": "teacher", "epoch": 1, "step": 1, "top1": 99.0}) + "\n")
        f.write(json.dumps({"stage": "main", "model": "teacher", "frozen_top1": 79.4}) + "\n")
        f.write(json.dumps({"stage": "main", "epoch": 3, "step": 30, "top1": 73.1}) + "\n")
    runs, _ = report.find_runs([tree["sweep"]])
    assert runs[0].curve() == pytest.approx({1: 61.9, 2: 71.9, 3: 73.1})  # test rows of the final stage only
    (group,) = report.group_runs(runs)
    epochs, stats, n = report.group_curve(group)
    assert epochs == [1, 2, 3] and n == 3
    for e, st in zip(epochs, stats):
        per_seed = [r.curve()[e] for r in runs]
        assert st.mean == pytest.approx(statistics.fmean(per_seed)) and st.std == pytest.approx(statistics.stdev(per_seed))


def test_no_run_exits_1(tree, tmp_path, capsys):
    assert report.main([str(tree["empty"])]) == 1
    err = capsys.readouterr().err
    assert "no finished run" in err and "no run found" in err
    assert report.main([str(tmp_path / "does-not-exist")]) == 1
    assert report.main([str(tree["sweep"] / "3")]) == 1  # only a failed run
    assert "failed [seed=3]" in capsys.readouterr().err


def test_real_sweep_end_to_end(tmp_path):
    """A real two-seed sweep of the quickstart, then ``python -m kdrun.report`` on it, both in subprocesses."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    sweep = tmp_path / "sweep"
    # +recipe is spelled out: `kdrun -m` without it puts the default recipe before -m, which Hydra rejects.
    proc = subprocess.run([sys.executable, "-m", "kdrun", "-m", "+recipe=quickstart", "data.subset=128",
                           "trainer.max_epochs=1", *QUIET, "seed=0,1", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "kdrun.report", str(sweep)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert len(rows) == 1, proc.stdout
    best = [json.loads((sweep / str(i) / "summary.json").read_text())["best_top1"] for i in (0, 1)]
    assert rows[0]["n"] == "2" and rows[0]["method"] == "KD" and rows[0]["student"] == "cnn_tiny"
    assert rows[0]["best top-1"].split(" ± ")[0] == f"{statistics.fmean(best):.2f}"
    assert "Not in the table" not in proc.stdout
    print(proc.stdout)


def test_probe_column_appears_with_linear_probe_runs(tmp_path):
    for seed, probe in ((0, 40.0), (1, 42.0)):
        s = write_run(tmp_path / f"rt{seed}", seed=seed, best=1.0, last=1.0, method="random teacher",
                      name="cifar10_random_teacher", data="cifar10", teacher="vgg11", student="vgg11")
        s["probe_top1"] = probe
        (tmp_path / f"rt{seed}" / "summary.json").write_text(json.dumps(s))
    write_run(tmp_path / "kd", seed=0, best=70.0, last=69.0)
    groups = report.group_runs(report.find_runs([tmp_path])[0])
    rows = {r["method"]: r for r in table_rows(report.markdown_table(groups))}
    assert rows["random teacher"]["probe top-1"] == mean_std([40.0, 42.0])
    assert rows["KD"]["probe top-1"] == "—"
    rec = {r["method"]: r for r in report.table_records(groups)}
    assert rec["random teacher"]["probe_top1_mean"] == pytest.approx(41.0)
