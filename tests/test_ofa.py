"""OFA-KD (Hao et al., NeurIPS 2023): the target-enhancement loss against its formula, and the exit branches
built from the student's stage shapes (CNN and transformer stages)."""
from __future__ import annotations

import pytest
import torch

from kdrun.component import BuildContext
from kdrun.losses import OFALoss
from kdrun.losses.ofa import SepConv, ofa_loss


def test_ofa_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    for eps in (1.0, 1.5):
        m = torch.nn.functional.one_hot(y, 5).double()
        want = (-((torch.softmax(t / 2, 1) + m) ** eps - m) * torch.log_softmax(s / 2, 1)).sum(1).mean()
        torch.testing.assert_close(ofa_loss(s, t, y, eps, 2.0).double(), want, rtol=1e-6, atol=1e-9)
    # eps = 1: the soft cross-entropy to the teacher
    soft_ce = -(torch.softmax(t, 1) * torch.log_softmax(s, 1)).sum(1).mean()
    torch.testing.assert_close(ofa_loss(s, t, y, 1.0).double(), soft_ce, rtol=1e-6, atol=1e-9)


def _term(stage_shapes, teacher_feat=64, **kw):
    term = OFALoss(num_classes=5, **kw)
    term.setup(BuildContext(shapes={"stages": [torch.Size(s) for s in stage_shapes], "student": torch.Size([2, 5]),
                                    "teacher": torch.Size([2, 5]), "target": torch.Size([2])}, num_train=2,
                            inputs={"teacher": "teacher.logits"}, tensor_shapes={"teacher.feat": (2, teacher_feat)}))
    return term


def test_cnn_branches_downsample_to_the_wider_of_the_last_stages():
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    term = _term(shapes, teacher_feat=64)
    assert [sum(isinstance(m, SepConv) for m in term.branches[k]) for k in ("1", "2", "3")] == [2, 1, 0]
    assert all(term.branches[k][-1].in_features == 64 for k in ("1", "2", "3"))  # max(D_s 32, D_t 64)
    feats = [torch.randn(*s) for s in shapes]
    out = term(feats, torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 3]))
    assert set(out) == {"final", "branches"}
    out["branches"].backward()
    assert all(p.grad is not None for p in term.branches.parameters())
    with pytest.raises(ValueError, match="eps has 2 values"):
        _term(shapes, eps=[1.0, 1.5])


def test_token_branches_use_transformer_blocks_and_refuse_large_grids():
    term = _term([(2, 64, 24), (2, 64, 24), (2, 64, 24)], branch_stages=[1, 3])
    assert list(term.branches) == ["1", "3"]
    blocks = [sum(type(m).__name__ == "Block" for m in term.branches[k]) for k in ("1", "3")]
    assert blocks == [2, 1]
    out = term([torch.randn(2, 64, 24)] * 3, torch.randn(2, 5), torch.randn(2, 5), torch.eye(5)[[0, 4]])  # soft targets
    assert torch.isfinite(out["branches"]) and torch.isfinite(out["final"])
    with pytest.raises(ValueError, match="patch merging"):
        _term([(2, 196, 24)])
