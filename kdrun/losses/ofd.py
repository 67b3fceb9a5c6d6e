"""Overhaul of feature distillation (OFD): pre-ReLU features, connectors, teacher margins, partial L2."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext, StageInfo
from kdrun.losses.base import LossTerm
from kdrun.losses.features import Features, Shapes, full_precision, paired_shapes, paired_tensors


def ofd_partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2, element-wise: with the teacher transformed to ``t' = max(t, m)``,
    ``(s - t')^2`` where ``s > t'`` or ``t' > 0``, else 0 (a student response below a negative teacher
    response is not penalised; a teacher response below the margin counts as the margin)."""
    t = torch.maximum(target, margin)
    mask = (source > t) | (t > 0)
    return (source - t).pow(2) * mask


def bn_margin(weight: Tensor, bias: Tensor, min_tail: float = 1e-3) -> Tensor:
    """The reference's margin per channel from a BatchNorm's affine parameters.

    Taking the BN output as ``x ~ N(m, s^2)`` with ``m = bias``, ``s = |weight|``, the margin is the
    expected negative response ``E[x | x < 0] = m - s * phi(m/s) / Phi(-m/s)`` (``phi``, ``Phi``: standard
    normal density and CDF) where ``Phi(-m/s) > min_tail``, and ``-3 s`` elsewhere (clovaai's and
    mdistiller's ``get_margin_from_BN``)."""
    s = weight.detach().cpu().abs().double()  # float64 on the host: a one-off, build-time computation
    m = bias.detach().cpu().double()
    safe_s = s.clamp(min=1e-12)
    z = m / safe_s
    tail = torch.special.ndtr(-z)
    expectation = m - safe_s * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) / tail.clamp(min=1e-300)
    return torch.where(tail > min_tail, expectation, -3.0 * s).float().to(weight.device)


class OFDConnector(nn.Sequential):
    """Student -> teacher channels: ``k x k`` conv without bias (He-normal init) + BatchNorm (weight 1, bias 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * out_channels)))
        bn = nn.BatchNorm2d(out_channels)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn)


class OFDLoss(LossTerm):
    """A comprehensive overhaul of feature distillation (OFD), Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019,
    as in mdistiller (the code behind the DKD paper's CIFAR-100 table) and the authors' code
    (clovaai/overhaul-distillation).

    Distils the *pre-ReLU* features of every stage. The student's map goes through a trainable connector
    ``r`` (1x1 conv + BN to the teacher's channels, created in :meth:`setup`); the teacher's map is
    adaptive-average-pooled to the student's spatial size where they differ. The teacher is transformed
    by a per-channel margin ``m_c < 0``, ``t' = max(t, m)``, and the partial L2 distance
    (:func:`ofd_partial_l2`) skips positions where both are negative and the student is already below:
    ``d = (r(s) - t')^2 * [r(s) > t' or t' > 0]``. Per stage pair ``i`` of K the loss is ``d`` summed over
    channels and positions and averaged over the batch, weighted ``w_i = 2^-(K-1-i)`` (1 for the deepest
    stage); the term returns the sum. It is 0 when ``r(s) = t'``.

    The margin is the expected negative pre-ReLU response of the teacher, ``m_c = E[t_c | t_c < 0]``
    (paper, Sec. 3.2). The reference codes evaluate it from the BatchNorm before the ReLU, assuming its
    output is ``N(beta_c, gamma_c^2)`` (:func:`bn_margin`). Here there are two sources:

    - ``teacher_bn: [module paths]`` (exact reference margins): per stage pair, the path of the teacher's
      BatchNorm whose output feeds that pre-ReLU tap (mdistiller's ``get_bn_before_relu``: the last
      block's ``bn2`` of each stage for CIFAR ResNets, e.g. ``[layer1.4.bn2, layer2.4.bn2, layer3.4.bn2]``
      for resnet32x4); :meth:`setup` reads them from the model through its build context and fixes the
      margins once (:meth:`set_teacher_bn`). This is what the published numbers used.
    - otherwise (default) the margin is estimated online from the teacher's pre-ReLU features the term
      sees in training: running averages (over all training steps, cumulative) of the per-channel
      ``mean(t * [t < 0])`` and ``mean([t < 0])`` (over batch and positions, before pooling) give
      ``m_c = E[t * [t < 0]] / P(t < 0)``, the paper's definition without the Gaussian assumption
      (0 for a channel never negative, where the margin has no effect). The frozen teacher's feature
      distribution is fixed, so the estimate converges within the first epoch; the statistics are
      buffers (checkpointed). For taps that are a BatchNorm output the two agree up to the Gaussian
      approximation; for ResNet stage outputs (BN + shortcut, then ReLU) the reference formula ignores
      the shortcut, the online estimate does not.

    The margins, statistics and a ``margin_fixed`` flag are buffers; nothing syncs with the host.

    Args:
        kernel_size: connector conv kernel (default 1, mdistiller's ``CONNECTOR.KERNEL_SIZE``).
        stage_weights: ``w_i`` per pair, shallow to deep; ``None`` (default): ``2^-(K-1-i)``.
        teacher_bn: the teacher's BatchNorms before each pre-ReLU tap: ``auto`` (the model's declared
            ``bn_before_relu``, the ``cifar100_ofd`` recipe's setting), their module paths, or ``None``
            (default: the online estimate). Re-read when each stage starts. teacher_model: the model they
            belong to (default ``teacher``).

    CIFAR-100 settings (mdistiller ``configs/cifar100/ofd.yaml`` with its defaults): cross-entropy weight 1,
    term weight 0.001 (``OFD.LOSS.FEAT_WEIGHT``; the authors' CIFAR code divides by 1000 too), no KD term,
    240 epochs like the DKD recipe. Inputs: ``student``, ``teacher``: equal-length lists of pre-ReLU
    (B, C, H, W) maps, ``[stage1_pre, .., stageK_pre]`` (mdistiller's ``preact_feats[1:]``). When the lists
    differ in length mdistiller keeps the deepest ``min`` stages of each; give equal lists here.
    """

    def __init__(self, kernel_size: int = 1, stage_weights: Sequence[float] | None = None,
                 teacher_bn: Sequence[str] | str | None = None, teacher_model: str = "teacher") -> None:
        super().__init__()
        if isinstance(teacher_bn, str) and teacher_bn != "auto":
            raise ValueError(f"OFD: teacher_bn must be 'auto', a list of BatchNorm module paths or null, got '{teacher_bn}'")
        self.teacher_bn: list[str] | str | None = (teacher_bn if teacher_bn is None or isinstance(teacher_bn, str)
                                                   else [str(p) for p in teacher_bn])
        self._teacher_bns: list[nn.Module] = []  # the teacher's BatchNorms (not submodules), re-read at each stage start
        self.teacher_model = str(teacher_model)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"OFD: kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.stage_weights = None if stage_weights is None else [float(w) for w in stage_weights]
        self.connectors = nn.ModuleList()
        self.num_pairs = 0
        self.margin_fixed: Tensor | None
        self.register_buffer("margin_fixed", None)

    # ------------------------------------------------------------------------------ build time
    def _pairs(self, student: Shapes, teacher: Shapes) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        pairs = paired_shapes("OFD", student, teacher, ndim=4)
        if self.stage_weights is not None and len(self.stage_weights) != len(pairs):
            raise ValueError(f"OFD: {len(self.stage_weights)} stage_weights for {len(pairs)} stage pairs")
        return pairs

    def setup(self, ctx: BuildContext) -> None:
        """Connectors and margin buffers: fixed from the teacher's BatchNorms given as ``teacher_bn``, else
        online statistics."""
        shapes = ctx.shapes
        pairs = self._pairs(shapes["student"], shapes["teacher"])
        self.num_pairs = len(pairs)
        self.connectors = nn.ModuleList([OFDConnector(s[1], t[1], self.kernel_size) for s, t in pairs])
        for i, (_, t) in enumerate(pairs):
            self.register_buffer(f"margin{i}", torch.zeros(t[1]))
            self.register_buffer(f"neg_sum{i}", torch.zeros(t[1]))   # running mean of t * [t < 0]
            self.register_buffer(f"neg_frac{i}", torch.zeros(t[1]))  # running mean of [t < 0]
        self.register_buffer("num_batches", torch.zeros(()))
        self.register_buffer("margin_fixed", torch.zeros((), dtype=torch.bool))
        if self.teacher_bn is not None:
            paths = self._auto_bn_paths(ctx) if self.teacher_bn == "auto" else self.teacher_bn
            self._teacher_bns = [ctx.module(self.teacher_model, path) for path in paths]
            self.set_teacher_bn(self._teacher_bns)

    def _auto_bn_paths(self, ctx: BuildContext) -> list[str]:
        """``teacher_bn: auto``: the BatchNorm before each teacher input tap, from the model's declared
        ``bn_before_relu`` (tap -> module path; kdrun's CIFAR ResNets, ResNet-50 and VGGs declare it)."""
        model = ctx.model(self.teacher_model)
        table = getattr(model, "bn_before_relu", None) or {}
        names = ctx.inputs.get("teacher", [])
        names = [names] if isinstance(names, str) else list(names)
        paths = []
        for name in names:
            tap = name.split(".", 1)[1] if name.startswith(f"{self.teacher_model}.") else None
            if tap is None or tap not in table:
                raise ValueError(f"OFD: teacher_bn=auto needs the BatchNorm before '{name}', and "
                                 f"{type(model).__name__} declares none for it (it declares: "
                                 f"{', '.join(table) or 'none'}). Give the paths (teacher_bn=[<module path>, ...]) "
                                 f"or use the online margins (teacher_bn=null)")
            paths.append(table[tap])
        return paths

    def on_stage_start(self, stage: StageInfo) -> None:
        """Margins from the teacher's BatchNorms as they are when a stage starts (a teacher trained by an
        earlier stage of the run has other statistics than at build time)."""
        super().on_stage_start(stage)
        if self._teacher_bns:
            self.set_teacher_bn(self._teacher_bns)

    def set_teacher_bn(self, bns: Sequence[nn.BatchNorm2d | tuple[Tensor, Tensor]]) -> None:
        """Fix the margins from the teacher's BatchNorm before each pre-ReLU tap (the reference's margins).

        ``bns``: one per stage pair, shallow to deep: a BatchNorm module or its ``(weight, bias)``."""
        if self.margin_fixed is None:
            raise RuntimeError("OFD: call setup(ctx) before set_teacher_bn")
        if len(bns) != self.num_pairs:
            raise ValueError(f"OFD: set_teacher_bn got {len(bns)} BatchNorms for {self.num_pairs} stage pairs")
        for i, bn in enumerate(bns):
            weight, bias = (bn.weight, bn.bias) if isinstance(bn, nn.Module) else bn
            margin = self.margin(i)
            if weight is None or tuple(weight.shape) != tuple(margin.shape):
                raise ValueError(f"OFD: the BatchNorm of stage pair {i} has "
                                 f"{None if weight is None else tuple(weight.shape)} channels, the teacher map "
                                 f"{tuple(margin.shape)}")
            with torch.no_grad():
                margin.copy_(bn_margin(weight, bias).to(margin.device))
        with torch.no_grad():
            self.margin_fixed.fill_(True)

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        pairs = self._pairs(student, teacher)
        if self.num_pairs and len(pairs) != self.num_pairs:
            raise ValueError(f"OFD: set up for {self.num_pairs} stage pairs, got {len(pairs)}")
        for i, ((s, t), conn) in enumerate(zip(pairs, self.connectors)):
            if (conn[0].in_channels, conn[0].out_channels) != (s[1], t[1]):
                raise ValueError(f"OFD: pair {i} was set up for {conn[0].in_channels} student and "
                                 f"{conn[0].out_channels} teacher channels, got 'student' {s} and 'teacher' {t}")

    # ------------------------------------------------------------------------------ margins
    def margin(self, i: int) -> Tensor:
        """The (C,) margin buffer of pair ``i``."""
        return getattr(self, f"margin{i}")

    @torch.no_grad()
    def _observe(self, teachers: list[Tensor]) -> None:
        """Fold the batch's teacher statistics into the running averages and refresh the margins
        (skipped, without a host sync, once the margins are fixed)."""
        keep = self.margin_fixed.float()  # 1: margins fixed, leave everything as it is
        n = self.num_batches + (1.0 - keep)
        step = (1.0 - keep) / n.clamp(min=1.0)
        stats = []
        for t in teachers:
            neg = (t < 0).to(t.dtype)
            stats += [(t * neg).mean(dim=(0, 2, 3)).float(), neg.mean(dim=(0, 2, 3)).float()]
        layout = self.spread_layout()  # _observe runs in training only
        if layout is not None:
            # the global micro-batch's means, as one process sees them: sum_r n_r * mean_r / N
            sizes, rank = layout
            flat = torch.cat(stats) * sizes[rank]
            torch.distributed.all_reduce(flat)
            flat = flat / sum(sizes)
            stats = list(torch.split(flat, [x.numel() for x in stats]))
        for i in range(len(teachers)):
            batch_sum, batch_frac = stats[2 * i], stats[2 * i + 1]
            s_buf, f_buf, m_buf = getattr(self, f"neg_sum{i}"), getattr(self, f"neg_frac{i}"), self.margin(i)
            s_buf.add_(step * (batch_sum - s_buf))
            f_buf.add_(step * (batch_frac - f_buf))
            online = torch.where(f_buf > 0, s_buf / f_buf.clamp(min=1e-12), torch.zeros_like(s_buf))
            m_buf.copy_(torch.where(self.margin_fixed, m_buf, online))
        self.num_batches.copy_(n)

    def weights(self, k: int) -> list[float]:
        return list(self.stage_weights) if self.stage_weights is not None else [2.0 ** -(k - 1 - i) for i in range(k)]

    def forward(self, student: Features, teacher: Features) -> Tensor:  # type: ignore[override]
        if not self.num_pairs:
            raise RuntimeError("OFD: the connectors do not exist yet: call setup(ctx) first")
        pairs = paired_tensors("OFD", student, teacher)
        if len(pairs) != self.num_pairs:
            raise ValueError(f"OFD: set up for {self.num_pairs} stage pairs, got {len(pairs)}")
        with full_precision(pairs[0][0]):
            teachers = [ft.detach() for _, ft in pairs]
            if self.training:
                self._observe(teachers)
            total = None
            for i, ((fs, _), ft, conn, w) in enumerate(zip(pairs, teachers, self.connectors, self.weights(len(pairs)))):
                rs = conn(fs)
                if tuple(ft.shape[-2:]) != tuple(rs.shape[-2:]):
                    ft = F.adaptive_avg_pool2d(ft, tuple(rs.shape[-2:]))
                m = self.margin(i).to(rs.dtype).view(1, -1, 1, 1)
                loss = ofd_partial_l2(rs, ft, m).sum() / rs.shape[0] * w
                total = loss if total is None else total + loss
        return total


__all__ = ["OFDConnector", "OFDLoss", "bn_margin", "ofd_partial_l2"]
