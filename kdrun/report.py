"""``kdrun-report``: one table (and optional plots) from many run and sweep directories.

A *run* is any folder that holds ``summary.json``; a folder with ``FAILED`` or ``.hydra/`` but no
``summary.json`` is a failed or incomplete run, and a sweep directory (``multirun.yaml``) whose job
folders are missing or empty reports those jobs too. Runs that differ only by seed form one *group*
(same name, method, data, teacher, student and overrides other than ``seed=`` and a few
output-only keys); each group is one row: mean ± sample std over its seeds.

    kdrun-report outputs/ multirun/ [--csv table.csv] [--plot published.png] [--curves curves.png]
    python -m kdrun.report PATH...            (the same, without the console script)

This module imports neither torch nor matplotlib at import time; the plots import matplotlib (Agg
backend) when asked for.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

PROG = "kdrun-report"
SHOTS = ("many", "medium", "few")
# Overrides that change what a run prints or writes, never what it learns: they do not split groups.
OUTPUT_ONLY_KEYS = frozenset({
    "seed", "trainer.progress", "trainer.tensorboard", "trainer.log_every", "trainer.save_every",
    "trainer.save_checkpoints", "data.root",
})
DASH = "—"


@dataclass
class Run:
    """One finished run: its directory and ``summary.json``."""

    path: Path
    summary: dict[str, Any]
    overrides: list[str]

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")

    @property
    def final_stage(self) -> str | None:
        stages = self.summary.get("stages") or {}
        return list(stages)[-1] if stages else None

    def value(self, key: str) -> float | None:
        if key == "rouge_l":  # the eval model's ROUGE-L (else the first generating model's)
            gen = self.summary.get("generation") or {}
            entry = gen.get(self.summary.get("eval_model")) or next(iter(gen.values()), None)
            return _num(entry.get("rouge_l")) if isinstance(entry, dict) else None
        return _num(self.summary.get(key))

    def shot(self, group: str, key: str = "shot_top1") -> float | None:
        shots = self.summary.get(key)
        return _num(shots.get(group)) if isinstance(shots, dict) else None

    def curve(self) -> dict[int, float]:
        """Test top-1 per epoch of the final stage, from ``metrics.jsonl`` (the last row of an epoch wins,
        so a resumed run that logged an epoch twice counts it once)."""
        path = self.path / "metrics.jsonl"
        stage = self.final_stage
        out: dict[int, float] = {}
        if not path.is_file():
            return out
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a run killed mid-write leaves half a line
                    continue
                if not isinstance(row, dict) or _num(row.get("top1")) is None or row.get("epoch") is None:
                    continue
                if stage is not None and row.get("stage", stage) != stage:
                    continue
                out[int(row["epoch"])] = float(row["top1"])
        return out


@dataclass
class Problem:
    """A folder that should have been a run and is not (failed, incomplete, missing, unreadable)."""

    path: Path
    reason: str


@dataclass
class Stat:
    """Mean ± sample standard deviation of the values that exist (``None`` values are skipped)."""

    values: list[float]

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        return cls([v for v in values if v is not None])

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    def text(self) -> str:
        if self.mean is None:
            return DASH
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class Group:
    """Runs that differ only by seed."""

    name: str | None
    method: str | None
    data: str | None
    teacher: str | None
    student: str | None
    overrides: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)
    include_smoke: bool = False  # compare smoke runs (subsets, capped epochs) with published numbers too

    @property
    def smoke(self) -> list[str]:
        """Why the group's runs are not comparable with published full runs (empty when they are)."""
        return sorted({why for r in self.runs for why in (r.summary.get("not_comparable") or [])})

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def stat(self, key: str) -> Stat:
        return Stat.of(r.value(key) for r in self.runs)

    def shot(self, group: str, key: str = "shot_top1") -> Stat:
        return Stat.of(r.shot(group, key) for r in self.runs)

    @property
    def published(self) -> dict[str, Any] | None:
        if self.smoke and not self.include_smoke:
            return None
        for r in self.runs:
            pub = r.summary.get("published")
            if isinstance(pub, dict) and _num(pub.get("top1")) is not None:
                return pub
        return None

    @property
    def reproduced(self) -> Stat | None:
        """The group's accuracy in the metric the published number uses (best or last)."""
        pub = self.published
        if pub is None:
            return None
        return self.stat("last_top1" if pub.get("metric") == "last" else "best_top1")

    @property
    def delta(self) -> float | None:
        pub, rep = self.published, self.reproduced
        if pub is None or rep is None or rep.mean is None:
            return None
        return rep.mean - float(pub["top1"])

    def label(self, extra: Sequence[str] = ()) -> str:
        who = self.method or self.name or "?"
        pair = f"{self.teacher} → {self.student}" if self.teacher else f"{self.student} (no teacher)"
        return " ".join([who, pair, *extra])


# ---------------------------------------------------------------------------------------------
# finding runs


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def _first_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else "(empty FAILED file)"
    if len(lines) > 1:
        line += f" (+{len(lines) - 1} more lines)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _last_logged(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return "no metrics.jsonl"
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "epoch" in row and "top1" in row:
                last = row
    if last is None:
        return "no epoch finished"
    return f"last finished epoch: stage '{last.get('stage')}' epoch {last.get('epoch')} (top-1 {last.get('top1')})"


def _seed_tag(overrides: list[str]) -> str:
    seeds = [o for o in overrides if _override_key(o) == "seed"]
    return f" [{seeds[0]}]" if seeds else ""


def _failed(run_dir: Path) -> Problem:
    overrides = _read_overrides(run_dir)
    failed = run_dir / "FAILED"
    if failed.is_file():
        try:
            msg = _first_line(failed.read_text(encoding="utf-8", errors="replace"))
        except OSError as ex:
            msg = f"(FAILED file unreadable: {ex})"
        return Problem(run_dir, f"failed{_seed_tag(overrides)}: {msg}")
    return Problem(run_dir, f"incomplete{_seed_tag(overrides)}: no summary.json and no FAILED file "
                            f"(crashed, killed or still running); {_last_logged(run_dir)}")


def _load_run(run_dir: Path) -> Run | Problem:
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        return Problem(run_dir, f"unreadable summary.json: {ex}")
    if not isinstance(summary, dict):
        return Problem(run_dir, "unreadable summary.json: not a JSON object")
    overrides = summary.get("overrides")
    if not isinstance(overrides, list):
        overrides = _read_overrides(run_dir)
    return Run(run_dir, summary, [str(o) for o in overrides])


def _sweep_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The task overrides of every job a Hydra basic-sweeper multirun planned, in job order (``None``
    when ``multirun.yaml`` cannot tell: another sweeper, a custom ``hydra.sweep.subdir``)."""
    try:
        import yaml
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        hydra_cfg = (yaml.safe_load((sweep_dir / "multirun.yaml").read_text(encoding="utf-8")) or {})["hydra"]
        sweeper = hydra_cfg.get("sweeper") or {}
        if "BasicSweeper" not in str(sweeper.get("_target_", "")):
            return None
        if str((hydra_cfg.get("sweep") or {}).get("subdir")) != "${hydra.job.num}":
            return None
        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += [str(a) for a in (hydra_cfg.get("overrides") or {}).get("task") or []]
        parsed = OverridesParser.create().parse_overrides(args)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # an unusual multirun.yaml only costs the missing-job check
        return None


def _check_sweep(sweep_dir: Path) -> list[Problem]:
    jobs = _sweep_jobs(sweep_dir)
    if jobs is None:
        return []
    out = []
    for num, job in enumerate(jobs):
        d = sweep_dir / str(num)
        if not d.is_dir():
            out.append(Problem(d, f"missing{_seed_tag(job)}: job {num} of {len(jobs)} never started "
                                  f"(overrides: {' '.join(job)})"))
        elif not any(d.iterdir()):
            out.append(Problem(d, f"incomplete{_seed_tag(job)}: empty job directory (job {num} of {len(jobs)})"))
    return out


def find_runs(paths: Sequence[str | os.PathLike]) -> tuple[list[Run], list[Problem]]:
    """Every run below ``paths`` (recursively) and every folder that should have been one."""
    runs: list[Run] = []
    problems: list[Problem] = []
    seen: set[str] = set()

    def add(item: Run | Problem) -> None:
        key = os.path.realpath(item.path)
        if key in seen:
            return
        seen.add(key)
        (runs if isinstance(item, Run) else problems).append(item)

    for raw in paths:
        top = Path(raw)
        if not top.exists():
            problems.append(Problem(top, "does not exist"))
            continue
        if not top.is_dir():
            if top.name == "summary.json":
                top = top.parent
            else:
                problems.append(Problem(top, "not a directory (give a run or sweep directory)"))
                continue
        before = len(runs) + len(problems)
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            dirnames.sort(key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
            if "summary.json" in filenames:
                add(_load_run(here))
                dirnames[:] = []
            elif "FAILED" in filenames or ".hydra" in dirnames:
                add(_failed(here))
                dirnames[:] = []
            else:
                if "multirun.yaml" in filenames:
                    for p in _check_sweep(here):
                        add(p)
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if len(runs) + len(problems) == before:
            problems.append(Problem(top, "no run found (no summary.json, FAILED or .hydra/ below it)"))
    problems.sort(key=lambda p: _natural(str(p.path)))
    return runs, problems


def _natural(text: str) -> list:
    """Sort key: sweep/2 before sweep/10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def group_runs(runs: Iterable[Run], ignore: Iterable[str] = ()) -> list[Group]:
    """Runs that differ only by seed (and output-only overrides, plus the keys in ``ignore``)."""
    skip = OUTPUT_ONLY_KEYS | {k.lstrip("+~") for k in ignore}
    groups: dict[tuple, Group] = {}
    for r in runs:
        s = r.summary
        ov = tuple(sorted(o for o in r.overrides if _override_key(o) not in skip and not o.startswith("hydra.")))
        key = (s.get("name"), s.get("method"), s.get("data"), s.get("teacher"), s.get("student"), ov)
        if key not in groups:
            groups[key] = Group(*key)
        groups[key].runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: (str(type(r.seed)), r.seed if r.seed is not None else 0, str(r.path)))
    return sorted(groups.values(), key=lambda g: tuple(str(x) for x in (g.data, g.teacher, g.student, g.method,
                                                                           g.name, g.overrides)))


def distinguishing(groups: Sequence[Group]) -> dict[int, list[str]]:
    """Per group (by index), the overrides that not every group shares (``+recipe=`` is the name)."""
    common = set.intersection(*(set(g.overrides) for g in groups)) if groups else set()
    return {i: [o for o in g.overrides if o not in common and _override_key(o) != "recipe"]
            for i, g in enumerate(groups)}


# ---------------------------------------------------------------------------------------------
# tables


def has_shots(groups: Sequence[Group]) -> bool:
    return any(isinstance(r.summary.get("shot_top1"), dict) for g in groups for r in g.runs)


def has_probe(groups: Sequence[Group]) -> bool:
    """Whether some run has a linear-probe result (``probe_top1``): the table gets a column for it."""
    return any(r.summary.get("probe_top1") is not None for g in groups for r in g.runs)


def has_text(groups: Sequence[Group]) -> tuple[bool, bool]:
    """Whether some run is a language model (perplexity) and whether some run scored generations (ROUGE-L)."""
    runs = [r for g in groups for r in g.runs]
    return any(r.value("best_ppl") is not None for r in runs), any(r.value("rouge_l") is not None for r in runs)


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return DASH
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def markdown_table(groups: Sequence[Group]) -> str:
    """The report as a markdown table: one row per group, mean ± std over seeds."""
    shots = has_shots(groups)
    extra = distinguishing(groups)
    show_ov = any(extra.values())
    head = ["method", "data", "teacher", "student", "n", "best top-1", "last top-1", "published", "Δ vs published"]
    if shots:
        head += ["many", "medium", "few"]
    probe = has_probe(groups)
    if probe:
        head += ["probe top-1"]
    ppl, rouge = has_text(groups)
    if ppl:
        head += ["best ppl", "last ppl"]
    if rouge:
        head += ["ROUGE-L"]
    if show_ov:
        head += ["overrides"]
    rows = []
    for i, g in enumerate(groups):
        pub = g.published
        pub_text = f"{float(pub['top1']):.2f} ({pub.get('metric', 'best')})" if pub else DASH
        row = [g.method or g.name or DASH, g.data or DASH, g.teacher or DASH, g.student or DASH, str(len(g.runs)),
               g.stat("best_top1").text(), g.stat("last_top1").text(), pub_text, _fmt(g.delta, signed=True)]
        if shots:
            row += [g.shot(s).text() for s in SHOTS]
        if probe:
            row += [g.stat("probe_top1").text()]
        if ppl:
            row += [g.stat("best_ppl").text(), g.stat("last_ppl").text()]
        if rouge:
            row += [g.stat("rouge_l").text()]
        if show_ov:
            row += [" ".join(extra[i]) or DASH]
        rows.append([c.replace("|", "\\|") for c in row])
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    right = {"n", "best top-1", "last top-1", "published", "Δ vs published", "probe top-1", "best ppl", "last ppl",
             "ROUGE-L", *SHOTS}

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, head)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if h in right else ("-" * (w + 2)) for w, h in zip(widths, head)) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def table_records(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """The same table with numbers split into columns (mean and std separately): the CSV rows."""
    shots = has_shots(groups)
    shots_best = any(isinstance(r.summary.get("shot_top1_best"), dict) for g in groups for r in g.runs)
    out = []
    for g in groups:
        pub = g.published
        rep = g.reproduced
        best, last = g.stat("best_top1"), g.stat("last_top1")
        rec: dict[str, Any] = {
            "name": g.name, "method": g.method, "data": g.data, "teacher": g.teacher, "student": g.student,
            "n_seeds": len(g.runs), "seeds": " ".join(str(s) for s in g.seeds),
            "best_top1_mean": best.mean, "best_top1_std": best.std,
            "last_top1_mean": last.mean, "last_top1_std": last.std,
            "best_top5_mean": g.stat("best_top5").mean, "last_top5_mean": g.stat("last_top5").mean,
            "published_top1": float(pub["top1"]) if pub else None,
            "published_metric": pub.get("metric") if pub else None,
            "published_source": pub.get("source") if pub else None,
            "reproduced_mean": rep.mean if rep else None, "reproduced_std": rep.std if rep else None,
            "delta": g.delta,
        }
        if has_probe(groups):
            rec["probe_top1_mean"], rec["probe_top1_std"] = g.stat("probe_top1").mean, g.stat("probe_top1").std
        ppl, rouge = has_text(groups)
        if ppl:
            for k in ("best_ppl", "last_ppl"):
                rec[f"{k}_mean"], rec[f"{k}_std"] = g.stat(k).mean, g.stat(k).std
        if rouge:
            rec["rouge_l_mean"], rec["rouge_l_std"] = g.stat("rouge_l").mean, g.stat("rouge_l").std
        if shots:
            for s in SHOTS:
                st = g.shot(s)
                rec[f"{s}_mean"], rec[f"{s}_std"] = st.mean, st.std
        if shots_best:
            for s in SHOTS:
                st = g.shot(s, "shot_top1_best")
                rec[f"best_{s}_mean"], rec[f"best_{s}_std"] = st.mean, st.std
        rec["wall_time_s_mean"] = g.stat("wall_time_s").mean
        rec["overrides"] = " ".join(g.overrides)
        rec["run_dirs"] = " ".join(str(r.path) for r in g.runs)
        out.append(rec)
    return out


def csv_text(groups: Sequence[Group]) -> str:
    records = table_records(groups)
    buf = io.StringIO()
    if not records:
        return ""
    w = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    w.writeheader()
    for rec in records:
        w.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()})
    return buf.getvalue()


def problem_lines(problems: Sequence[Problem]) -> list[str]:
    return [f"- {p.path}: {p.reason}" for p in problems]


def notes(groups: Sequence[Group]) -> list[str]:
    """Things worth a second look: a seed counted twice in a group."""
    out = []
    for g in groups:
        seeds = g.seeds
        dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if dup:
            out.append(f"- note: {g.label()} has seed {', '.join(dup)} more than once "
                       f"({' '.join(str(r.path) for r in g.runs)})")
        if g.smoke and any(isinstance(r.summary.get("published"), dict) for r in g.runs):
            shown = "shown anyway (--include-smoke)" if g.include_smoke else "left out of the published comparison (--include-smoke shows it)"
            out.append(f"- note: {g.label()} are smoke runs ({'; '.join(g.smoke)}): {shown}")
    return out


# ---------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_published(groups: Sequence[Group], path: str | os.PathLike) -> None:
    """Reproduced vs published top-1, one point per group (error bar: std over seeds) and the identity
    line; color = method, label = teacher → student. Without any published number: a bar chart of
    best top-1 per group."""
    plt = _pyplot()
    extra = distinguishing(groups)
    with_pub = [(i, g) for i, g in enumerate(groups) if g.published is not None and g.reproduced.mean is not None]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    if with_pub:
        methods = list(dict.fromkeys(g.method or g.name or "?" for _, g in with_pub))
        colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
        xs, ys = [], []
        for i, g in with_pub:
            x, rep = float(g.published["top1"]), g.reproduced
            m = g.method or g.name or "?"
            ax.errorbar(x, rep.mean, yerr=rep.std or 0.0, fmt="o", color=colors[m], capsize=4, ms=6,
                        label=m if m in methods else None)
            methods = [k for k in methods if k != m]  # one legend entry per method
            pair = f"{g.teacher} → {g.student}" if g.teacher else str(g.student)
            text = " ".join([pair, *extra[i]]) + f" (n={rep.n})"
            ax.annotate(text, (x, rep.mean), textcoords="offset points", xytext=(6, 4), fontsize=7)
            xs.append(x)
            ys.append(rep.mean)
        lo, hi = min(xs + ys), max(xs + ys)
        pad = max(1.0, 0.08 * (hi - lo))
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="gray", lw=1, label="reproduced = published")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("published top-1 (%)")
        ax.set_ylabel("reproduced top-1 (%), mean ± std over seeds")
        ax.set_title("reproduced vs published top-1 (in the published metric: best or last)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    else:
        labels = [g.label(extra[i]) for i, g in enumerate(groups)]
        stats = [g.stat("best_top1") for g in groups]
        pos = range(len(groups))
        ax.bar(pos, [s.mean or 0.0 for s in stats], yerr=[s.std or 0.0 for s in stats], capsize=4, color="tab:blue",
               width=0.6)
        ax.set_xlim(-0.8, len(groups) - 0.2)
        ax.set_xticks(list(pos), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("best top-1 (%), mean ± std over seeds")
        ax.set_title("best top-1 per group (no published numbers in these runs)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def group_curve(g: Group) -> tuple[list[int], list[Stat], int]:
    """A group's test top-1 per epoch over its seeds: (epochs, per-epoch stats, runs that logged any)."""
    curves = [c for c in (r.curve() for r in g.runs) if c]
    epochs = sorted(set().union(*curves)) if curves else []
    return epochs, [Stat.of(c.get(e) for c in curves) for e in epochs], len(curves)


def plot_curves(groups: Sequence[Group], path: str | os.PathLike) -> None:
    """Test top-1 per epoch of the final stage, mean over seeds (band: ± std), one line per group."""
    plt = _pyplot()
    extra = distinguishing(groups)
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for i, g in enumerate(groups):
        epochs, stats, n = group_curve(g)
        if not epochs:
            continue
        mean = [s.mean for s in stats]
        line, = ax.plot(epochs, mean, marker="o" if len(epochs) < 30 else None, ms=3,
                        label=f"{g.label(extra[i])} (n={n})")
        if n > 1:
            std = [s.std or 0.0 for s in stats]
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
        drawn += 1
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not drawn:
        ax.text(0.5, 0.5, "no per-epoch test top-1 in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("epoch (final stage)")
    ax.set_ylabel("test top-1 (%), mean over seeds")
    ax.set_title("test top-1 per epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Summarize kdrun run and sweep directories: one row per group of runs that differ only "
                    "by seed (mean ± std over seeds), next to the published number when the recipe records one.",
        epilog="Failed, incomplete and missing runs are listed below the table. Exit code 0 when at least "
               "one run was read, 1 when none.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="run directories, sweep directories, or any folder above them")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV (mean and std in separate columns)")
    p.add_argument("--plot", metavar="FILE.png", help="write reproduced vs published top-1 per (teacher, student) pair")
    p.add_argument("--curves", metavar="FILE.png", help="write test top-1 per epoch per group (mean over seeds)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="what to print on stdout")
    p.add_argument("--include-smoke", action="store_true",
                   help="compare smoke runs (data.subset, trainer.max_epochs caps, ...) with published numbers too")
    p.add_argument("--ignore", metavar="KEY", action="append", default=[],
                   help="an override key that must not split groups (repeatable); always ignored: "
                        + ", ".join(sorted(OUTPUT_ONLY_KEYS)))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``kdrun-report PATH... [--csv FILE] [--plot FILE.png] [--curves FILE.png] [--format markdown|csv]``."""
    args = build_parser().parse_args(argv)
    runs, problems = find_runs(args.paths)
    groups = group_runs(runs, args.ignore)
    for g in groups:
        g.include_smoke = args.include_smoke
    tail = problem_lines(problems) + notes(groups)
    if not runs:
        if tail:
            print("\n".join(tail), file=sys.stderr)
        print(f"{PROG}: error: no finished run (summary.json) found under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    if args.format == "csv":
        sys.stdout.write(csv_text(groups))
        if tail:
            print("\n".join(tail), file=sys.stderr)
    else:
        out = [markdown_table(groups), "",
               f"{len(runs)} run(s) in {len(groups)} group(s); mean ± sample std over seeds; "
               f"Δ = reproduced mean (published metric) − published"]
        if problems:
            out += ["", f"Not in the table ({len(problems)}):", *problem_lines(problems)]
        if notes(groups):
            out += ["", "Notes:", *notes(groups)]
        print("\n".join(out))
    code = 0
    try:
        if args.csv:
            Path(args.csv).write_text(csv_text(groups), encoding="utf-8")
            print(f"{PROG}: wrote {args.csv}", file=sys.stderr)
        if args.plot:
            plot_published(groups, args.plot)
            print(f"{PROG}: wrote {args.plot}", file=sys.stderr)
        if args.curves:
            plot_curves(groups, args.curves)
            print(f"{PROG}: wrote {args.curves}", file=sys.stderr)
    except ModuleNotFoundError as ex:
        print(f"{PROG}: error: the plots need matplotlib ({ex}); pip install matplotlib", file=sys.stderr)
        code = 1
    except OSError as ex:
        print(f"{PROG}: error: cannot write output: {ex}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
