"""Loss terms that read logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.losses.base import LossTerm, require_same_shape


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row of logits: ``(z - mean(z)) / (std(z) + eps)``.

    Logit standardisation, Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024:
    the student matches the teacher's *relation* between logits rather than their magnitude. Used
    with a base temperature (the paper's default for KD is 2).
    """
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)


class CrossEntropy(LossTerm):
    """Cross-entropy with the ground truth, optionally label-smoothed.

    ``CE = -1/B sum_i sum_c q_ic log softmax(z_i)_c`` with ``q = (1 - eps) onehot(y) + eps / C``.
    ``target`` may also be a (B, C) matrix of soft targets (mixup), used as ``q`` directly.

    Args:
        label_smoothing: eps above (default 0, plain cross-entropy).
        standardize: divide each row of logits by its standard deviation first (the "MixSTD"
            rescaling of Choi et al., WACV 2023, for mixup with KD; z-scoring gives the same
            softmax); default False.
    """

    def __init__(self, label_smoothing: float = 0.0, standardize: bool = False) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.standardize = bool(standardize)

    def check_shapes(self, logits: torch.Size, target: torch.Size) -> None:  # type: ignore[override]
        if len(logits) != 2:
            raise ValueError(f"cross-entropy: 'logits' must be (batch, classes), got {tuple(logits)}")
        if tuple(target) != (logits[0],) and tuple(target) != tuple(logits):
            raise ValueError(
                f"cross-entropy: 'target' {tuple(target)} must be (batch,) class indices or "
                f"(batch, classes) soft targets for logits {tuple(logits)}"
            )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        logits = _float(logits)  # the loss arithmetic in float32 under autocast
        if self.standardize:
            logits = standardize_logits(logits)
        return F.cross_entropy(logits, _float(target) if target.is_floating_point() else target,
                               label_smoothing=self.label_smoothing)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-sample ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` from log-probabilities, shape (B,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class ReverseKLLoss(LossTerm):
    """Reverse KL distillation: ``L = T^2 / B * sum_i KL( softmax(s_i / T) || softmax(t_i / T) )``.

    The divergence from the *learner's* distribution to the target's (mode-seeking: the learner
    puts its mass where the target is confident), the reverse of :class:`KDLoss`. ``student`` is the
    network this term trains, ``teacher`` the target it reads (in online distillation the roles
    can be swapped to train a teacher from its student).

    Args:
        temperature: T (default 1).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"reverse KL: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("reverse KL", "student", student, "teacher", teacher)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        t = self.temperature
        student, teacher = _float(student), _float(teacher)  # the loss arithmetic in float32 under autocast
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        return _kl_rows(log_p_s, log_p_t).mean() * (t * t)


class BalancedKLLoss(LossTerm):
    """Per-sample balance of forward and reverse KL by the entropy gap between student and teacher.

    BD-KD (Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation",
    arXiv 2212.12965) replaces the student's online-distillation KL by a sample-wise weighting of
    the forward KL ``KL(p_t || p_s)`` (mode-covering: softens the student) and the reverse KL
    ``KL(p_s || p_t)`` (mode-seeking: sharpens it), guided by the entropy gap between the two
    predictions, to balance the student's confidence. The paper's exact weight could not be
    checked here; kdrun uses this form:

    ``L = T^2 / B * sum_i [ a_i KL(p_t,i || p_s,i) + (1 - a_i) KL(p_s,i || p_t,i) ]``,
    ``a_i = sigmoid( (H(p_t,i) - H(p_s,i)) / tau )`` (no gradient through ``a_i``),

    so a sample on which the student is more confident than the teacher (lower entropy) is pulled
    towards the teacher's spread by the forward KL, and one on which it is less confident is
    sharpened by the reverse KL; ``tau -> 0`` gives a hard switch.

    Args:
        temperature: T (default 1, as online distillation). tau: the gap's scale (default 0.1 nats).
    """

    def __init__(self, temperature: float = 1.0, tau: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0 or tau <= 0:
            raise ValueError(f"balanced KL: temperature and tau must be positive, got {temperature}, {tau}")
        self.temperature, self.tau = float(temperature), float(tau)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("balanced KL", "student", student, "teacher", teacher)

    def balance(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``a_i`` above, shape (B,)."""
        t = self.temperature
        log_p_s = F.log_softmax(_float(student.detach()) / t, dim=-1)
        log_p_t = F.log_softmax(_float(teacher.detach()) / t, dim=-1)
        h_s = -(log_p_s.exp() * log_p_s).sum(-1)
        h_t = -(log_p_t.exp() * log_p_t).sum(-1)
        return torch.sigmoid((h_t - h_s) / self.tau)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        t = self.temperature
        student, teacher = _float(student), _float(teacher)  # the loss arithmetic in float32 under autocast
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        a = self.balance(student, teacher)
        per_sample = a * _kl_rows(log_p_t, log_p_s) + (1 - a) * _kl_rows(log_p_s, log_p_t)
        return per_sample.mean() * (t * t)


class KDLoss(LossTerm):
    """Hinton's knowledge distillation, "Distilling the Knowledge in a Neural Network" (2015).

    ``L = T^2 / B * sum_i KL( softmax(t_i / T) || softmax(s_i / T) )``: the KL divergence from the
    teacher's softened distribution to the student's, summed over classes, averaged over the batch,
    and scaled by ``T^2`` so that its gradients keep their size as T changes.

    Args:
        temperature: T (default 4, the CIFAR-100 benchmark setting).
        standardize: z-score both logit vectors before the softmax (logit standardisation,
            Sun et al. CVPR 2024); default False.
    """

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.standardize = bool(standardize)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("KD", "student", student, "teacher", teacher)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        t = self.temperature
        student, teacher = _float(student), _float(teacher)  # the loss arithmetic in float32 under autocast
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * (t * t)


def _float(x: Tensor) -> Tensor:
    """``x`` in float32 for the loss arithmetic (bf16/fp16 upcast, float64 kept)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _binary_log_probs(z: Tensor, gt_mask: Tensor, target: Tensor) -> Tensor:
    """``log [p_target, 1 - p_target]`` of ``softmax(z)`` per row, computed exactly in log space.

    ``log(1 - p_target)`` is the log-sum-exp of the non-target logits minus that of all logits, so
    it stays finite (and exact) even where ``p_target`` rounds to 1.
    """
    lse_all = torch.logsumexp(z, dim=1)
    log_p_target = z.gather(1, target.unsqueeze(1)).squeeze(1) - lse_all
    log_p_rest = torch.logsumexp(z.masked_fill(gt_mask, float("-inf")), dim=1) - lse_all
    return torch.stack([log_p_target, log_p_rest], dim=1)


def _non_target_log_probs(z: Tensor, gt_mask: Tensor) -> Tensor:
    """Log-softmax over the non-target classes only (the target entry is set to 0, not -inf).

    The target class is removed exactly (its logit becomes -inf before the softmax); its entry is
    then replaced by 0 so that ``p * (log p - log q)`` is 0 there instead of NaN, with zero gradient.
    """
    log_p = F.log_softmax(z.masked_fill(gt_mask, float("-inf")), dim=1)
    return torch.where(gt_mask, torch.zeros_like(log_p), log_p)


class DKDLoss(LossTerm):
    """Decoupled knowledge distillation (DKD), Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

    With ``p = softmax(z / T)`` and ``t`` the ground-truth class, KD is split into
    - TCKD, target-class KD: KL between the binary distributions ``[p_t, 1 - p_t]`` of teacher and
      student (how confident each is in the right class);
    - NCKD, non-target-class KD: KL between the distributions over the non-target classes alone
      (``softmax`` of the logits with class ``t`` removed), i.e. the "dark knowledge".
    ``L = T^2 / B * sum_i (alpha * TCKD_i + beta * NCKD_i)``. Classic KD is
    ``KD_i = TCKD_i + (1 - p^teacher_t,i) * NCKD_i``: DKD decouples the NCKD weight from the
    teacher's confidence.

    The target class is masked out exactly (its logit set to -inf, with the masked entries zeroed),
    where the reference code (megvii-research/mdistiller) subtracts 1000 from ``z_t / T`` and takes
    ``log`` of summed probabilities; both give the same value up to rounding, this one stays finite
    when ``p_t`` rounds to 1.

    Returns ``{"tckd": alpha * T^2 * TCKD, "nckd": beta * T^2 * NCKD}`` (already weighted; the
    engine sums the parts).

    Args:
        alpha: TCKD weight (default 1.0). beta: NCKD weight (default 8.0).
        temperature: T (default 4.0).
        standardize: z-score both logit vectors first (logit standardisation, Sun et al. CVPR 2024);
            default False.

    CIFAR-100 settings of the published DKD table (mdistiller configs): alpha=1, T=4, CE weight 1,
    term weight 1 with a linear warm-up over the first 20 epochs (``min(epoch / 20, 1)`` per epoch with
    1-based epochs: 0.05 in the first, 1 from the 20th; done by the engine via ``warmup_epochs``),
    beta=8 by default, beta=2 for resnet56->resnet20 and
    resnet110->resnet32, beta=6 for wrn_40_2->wrn_16_2, wrn_40_2->wrn_40_1, vgg13->vgg8 and
    vgg13->MobileNetV2. Inputs: ``student``, ``teacher`` (logits), ``target`` (class indices).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DKD: temperature must be positive, got {temperature}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.standardize = bool(standardize)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, target: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("DKD", "student", student, "teacher", teacher)
        if len(student) != 2 or student[1] < 2:
            raise ValueError(f"DKD: logits must be (batch, classes) with at least 2 classes, got 'student' {tuple(student)}")
        if tuple(target) != (student[0],):
            raise ValueError(
                f"DKD: 'target' {tuple(target)} must be (batch,) class indices for logits {tuple(student)} "
                f"(soft targets, e.g. from mixup, have no single target class)"
            )

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        student, teacher = _float(student), _float(teacher)
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        t = self.temperature
        zs, zt = student / t, teacher / t
        target = target.long()
        gt_mask = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, target.unsqueeze(1), True)

        log_bs = _binary_log_probs(zs, gt_mask, target)
        log_bt = _binary_log_probs(zt, gt_mask, target)
        tckd = (log_bt.exp() * (log_bt - log_bs)).sum(dim=1).mean()

        log_ns = _non_target_log_probs(zs, gt_mask)
        log_nt = _non_target_log_probs(zt, gt_mask)
        nckd = (log_nt.exp() * (log_nt - log_ns)).sum(dim=1).mean()

        scale = t * t
        return {"tckd": self.alpha * scale * tckd, "nckd": self.beta * scale * nckd}


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: cosine of the centred vectors."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


class DISTLoss(LossTerm):
    """DIST, Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.

    Matches *relations* between predictions instead of the predictions themselves. With
    ``Y = softmax(z / tau)`` (a B x C matrix per model) and ``rho`` the Pearson correlation:
    - inter-class relation: ``1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` (each sample's row over classes);
    - intra-class relation: ``1 - mean_c rho(Y_s[:, c], Y_t[:, c])`` (each class's column over the batch).
    ``L = tau^2 * (beta * inter + gamma * intra)``. ``rho`` is the cosine of the mean-centred vectors
    with ``eps`` added to the product of norms (1e-8, as in the official code; so the loss of equal
    inputs is not exactly 0 but of order ``tau^2 * eps / ||centred probabilities||^2``). Invariant
    to adding a per-sample constant to the logits; the intra-class part needs a batch of at least 2.

    Returns ``{"inter": beta * tau^2 * inter, "intra": gamma * tau^2 * intra}`` (already weighted).

    Args:
        beta: inter-class weight (default 1). gamma: intra-class weight (default 1).
        tau: softmax temperature (default 1, the official code's default and its ImageNet setting).
        standardize: z-score both logit vectors first (Sun et al. CVPR 2024); default False.
        eps: added to the denominator of the correlation (default 1e-8).

    CIFAR-100: the official code (hunto/DIST_KD, image_classification_sota ``kd_loss.py``) runs the
    CIFAR recipe with ``--kd dist_t4``, i.e. ``beta=1, gamma=1, tau=4``; set the term weight (and CE
    weight) from that recipe.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, standardize: bool = False,
                 eps: float = 1e-8) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"DIST: tau must be positive, got {tau}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.standardize = bool(standardize)
        self.eps = float(eps)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("DIST", "student", student, "teacher", teacher)
        if len(student) != 2:
            raise ValueError(f"DIST: logits must be (batch, classes), got 'student' {tuple(student)}")

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        student, teacher = _float(student), _float(teacher)
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        ys = F.softmax(student / self.tau, dim=1)
        yt = F.softmax(teacher / self.tau, dim=1)
        inter = 1.0 - _pearson(ys, yt, dim=1, eps=self.eps).mean()
        intra = 1.0 - _pearson(ys, yt, dim=0, eps=self.eps).mean()
        scale = self.tau * self.tau
        return {"inter": self.beta * scale * inter, "intra": self.gamma * scale * intra}


class BinaryKLLoss(LossTerm):
    """DHKD's logit loss (``BinaryKLNorm``; Yang et al., "Dual-Head Knowledge Distillation", arXiv 2411.08937):
    per sample and class, the binary KL from Bernoulli(0.5) to Bernoulli(sigmoid((z_s - z_t) / T)),

        ``L = T^2 / B * sum_{i,c} KL(Bern(0.5) || Bern(d_ic))``,  ``d = clamp(sigmoid((z_s - z_t) / T), eps, 1 - eps)``,

    zero exactly when the logits match (a logit-matching loss; its minimum does not depend on a softmax).
    In DHKD it trains an auxiliary head (``kdrun.models.heads.AuxiliaryHead``) while the main head gets CE.

    Args:
        temperature: T (default 2, the CIFAR setting). eps: the clamp (default 1e-8).
    """

    def __init__(self, temperature: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"binary KL: temperature must be positive, got {temperature}")
        self.temperature, self.eps = float(temperature), float(eps)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("binary KL", "student", student, "teacher", teacher)
        if len(student) != 2:
            raise ValueError(f"binary KL: logits must be (batch, classes), got {tuple(student)}")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        t = self.temperature
        d = torch.sigmoid((_float(student) - _float(teacher)) / t).clamp(self.eps, 1 - self.eps)
        kl = 0.5 * (math.log(0.5) - torch.log(d)) + 0.5 * (math.log(0.5) - torch.log1p(-d))
        return t * t * kl.sum() / student.shape[0]


class HardDistillationLoss(LossTerm):
    """DeiT's hard-label distillation (Touvron et al., "Training data-efficient image transformers &
    distillation through attention", ICML 2021): cross-entropy of the student's logits against the
    teacher's top-1 class, ``L = -1/B sum_i log softmax(z_s,i)_{argmax_c z_t,ic}``. The teacher's
    argmax carries no gradient. G2SD's specific stage applies it to the distillation token's head with
    weight 1/2 (the class token's head gets the mixed labels' cross-entropy, weight 1/2).

    Inputs: ``student`` (B, C) logits, ``teacher`` (B, C) logits or scores.
    """

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("hard distillation", "student", student, "teacher", teacher)
        if len(student) != 2:
            raise ValueError(f"hard distillation: logits must be (batch, classes), got {tuple(student)}")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        return F.cross_entropy(_float(student), teacher.detach().argmax(dim=-1))
