"""DisWOT (Dong, Li & Wei, CVPR 2023): the semantic and relation metrics against their formulas, the student's
classifier receiving the semantic gradient, and ``kdrun-search`` ranking candidates at initialisation."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdrun.component import BuildContext
from kdrun.losses import DisWOTRelationLoss, DisWOTSemanticLoss


class _Net(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, 5)


def _semantic(fs, ft, ws, wt):
    def gram(a, w):  # CAM of class n: sum_c w_nc A^c over every sample and position
        g = torch.stack([(w[n].view(1, -1, 1, 1) * a).sum(1).flatten() for n in range(w.shape[0])])
        m = g @ g.t()
        return m / m.norm(dim=1, keepdim=True)
    return (gram(ft, wt) - gram(fs, ws)).norm() / 25


def test_semantic_and_relation_metrics_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    student, teacher = _Net(3), _Net(6)
    term = DisWOTSemanticLoss()
    term.setup(BuildContext(shapes={}, num_train=4, models={"student": student, "teacher": teacher},
                            inputs={"student": "student.last_stage", "teacher": "teacher.last_stage"},
                            tensor_shapes={"student.logits": (4, 5), "teacher.logits": (4, 5)}))
    term.check_shapes(fs.shape, ft.shape)
    got = term(fs, ft)
    torch.testing.assert_close(got, _semantic(fs, ft, student.fc.weight, teacher.fc.weight), rtol=1e-5, atol=1e-7)
    got.backward()
    assert student.fc.weight.grad is not None and teacher.fc.weight.grad is None
    assert list(term.state_dict()) == [] and list(term.parameters()) == []  # the models' layers are not the term's
    a = lambda f: F.normalize(f.flatten(1) @ f.flatten(1).t(), dim=1)  # noqa: E731
    torch.testing.assert_close(DisWOTRelationLoss()(fs, ft), (a(ft) - a(fs)).norm() / 16)
    assert float(DisWOTRelationLoss(normalize_loss=False)(ft, ft)) == pytest.approx(0.0, abs=1e-6)


SMALL = ["data=synthetic", "data.num_classes=10", "data.batch_size=16", "data.source.num_train=32", "data.source.num_test=8",
         "teacher=resnet8x4", "teacher.checkpoint=null", "trainer.device=cpu"]


def test_search_scores_a_copy_of_the_teacher_zero_and_ranks_it_first():
    from kdrun.search import rank

    rows = rank(["resnet8", "resnet8x4"], SMALL)
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["score"] <= rows[1]["score"]
    copy = rank(["resnet8x4"], SMALL + ["+student.init_from=teacher"])[0]
    assert copy["semantic"] == pytest.approx(0.0, abs=1e-5) and copy["relation"] == pytest.approx(0.0, abs=1e-5)
    assert all(r["score"] > 1e-3 for r in rows)


@pytest.mark.slow
def test_kdrun_search_command_writes_its_ranking(tmp_path):
    import subprocess

    out = tmp_path / "rank.json"
    proc = subprocess.run([sys.executable, "-m", "kdrun.search", "--candidates", "resnet8,wrn_16_1", "--out", str(out), *SMALL],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["student"] for r in rows} == {"resnet8", "wrn_16_1"} and "| rank | student |" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "kdrun.search", "--candidates", "resnet8", "--recipe", "cifar100_kd", *SMALL,
                          "teacher.checkpoint=null"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "DisWOTSemanticLoss" in bad.stderr
