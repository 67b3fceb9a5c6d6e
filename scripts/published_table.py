#!/usr/bin/env python
"""Print the ``published:`` block of a recipe from reference/cifar100_published.csv.

    python scripts/published_table.py KD            # the KD rows of the CRD table
    python scripts/published_table.py student_alone # the "student alone" column

Model names of the table are mapped to kdrun's zoo names (wrn-40-2 -> wrn_40_2, ShuffleV1 ->
shufflenetv1, ...). Recipes embed the printed block, so runs need no file outside the package.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

CSV = Path(__file__).resolve().parents[1] / "reference" / "cifar100_published.csv"
NAMES = {
    "wrn-40-2": "wrn_40_2", "wrn-16-2": "wrn_16_2", "wrn-40-1": "wrn_40_1", "MobileNetV2": "mobilenetv2",
    "ShuffleNetV1": "shufflenetv1", "ShuffleV1": "shufflenetv1", "ShuffleNetV2": "shufflenetv2",
    "ShuffleV2": "shufflenetv2", "ResNet50": "resnet50",
}


def zoo_name(name: str) -> str:
    return NAMES.get(name, name)


def rows(method: str) -> list[dict[str, str]]:
    with open(CSV, newline="") as f:
        return [r for r in csv.DictReader(f) if r["method"] == method]


def block(method: str) -> str:
    found = rows(method)
    if not found:
        raise SystemExit(f"no rows for method '{method}' in {CSV}")
    sources = sorted({r["source"] for r in found})
    metric = "best" if found[0]["metric"].startswith("best") else "last"
    lines = ["published:", f'  source: "{"; ".join(sources)}"', f"  metric: {metric}", "  table:"]
    seen = set()
    for r in found:
        teacher = None if method in ("student_alone", "teacher_alone") else zoo_name(r["teacher"])
        student = zoo_name(r["teacher"] if method == "teacher_alone" else r["student"])
        if (teacher, student) in seen:
            continue
        seen.add((teacher, student))
        note = f', note: "{r["note"]}"' if r["note"] else ""
        t = f"teacher: {teacher}, " if teacher else ""
        lines.append(f"    - {{{t}student: {student}, top1: {r['top1']}{note}}}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(block(sys.argv[1] if len(sys.argv) > 1 else "KD"))
