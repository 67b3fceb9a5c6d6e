"""Knowledge distillation via a token-level relationship graph (TRG).

Zhang, Liu & He, "Knowledge Distillation via Token-level Relationship Graph", arXiv 2306.12442 (2023);
journal version in Big Data Research (2024). The student learns three things from the teacher's
*tokens* (spatial positions of a CNN feature map, or a ViT's patch tokens):

- ``contextual`` (the paper's ``L_inner``): per image, the token-to-token attention map
  ``CS = softmax(F F^T / sqrt(D))`` (N x N) of the student matches the teacher's (MSE);
- ``local`` (local preserving loss): a k-nearest-neighbour graph over a random sample of tokens,
  edges weighted by a Gaussian kernel ``A_ij = exp(-||T_i - T_j||^2 / (2 sigma))``; for every node,
  the distribution over its neighbours in the student graph matches the teacher's (KL);
- ``global`` (global topology loss): InfoNCE between linearly projected student and teacher tokens,
  the same token in the two models being the positive pair and every other sampled token a negative,
  with a temperature ``tau_g`` that goes from high (coarse structure, early training) to low
  (fine structure, hard negatives, late training).

The paper's total objective is ``L = L_CE + L_KD + alpha L_inner + beta L_local + gamma L_global``.

Sources and what was (not) found
--------------------------------
The paper's full text was not available to us: only its abstract (arXiv) and a third-party summary
that reproduces its equations (the adjacency above, ``L_local = sum_i KL(softmax_j(A^S_ij) ||
softmax_j(A^T_ij))``, ``L_global = -sum_i log exp(SIM(T^S_i, T^T_i)/tau_g) / sum_j exp(SIM(T^S_i,
T^T_j)/tau_g)``, ``CS = softmax(F F'/sqrt(D))``, ``L_inner = MSE(CS^T, CS^S)``, the total above, the CNN
tokens taken from a late feature map cut into fixed-size patches, tokens sampled at random from every
image of the batch, larger batches (up to 512) helping). **No numeric hyper-parameter of the paper
was found**: k, sigma, tokens per image, patch size, alpha, beta, gamma, the projection width and the
temperature schedule (its form and end points) are all *chosen here*; each default below says so.
Recipes that reproduce the paper's tables must set them from the paper once it is at hand.

Design decisions (ours, documented where they are made)
-------------------------------------------------------
- Graph over the whole batch (default ``graph="batch"``): the nodes are the ``B x S`` sampled tokens of
  all images, so edges join similar tokens of *different* images, which is the point of the paper
  (cross-instance token relations; it reports larger batches to help). ``graph="image"`` builds one
  graph per image instead (linear in B).
- The teacher's neighbourhoods are used for both graphs; the softmax runs over the k neighbours of
  each node only (not over all nodes).
- KL direction: teacher distribution as the target, ``KL(P_T || P_S)``, as in Hinton's KD (the
  summary writes the arguments in the other order; its notation is ambiguous).
- Tokens are L2-normalised before the graph (``normalize=True``): with raw CNN features ``d^2`` is in
  the hundreds and the kernel underflows to 0 for every edge (a uniform distribution, no signal).
- Losses are *averaged* over nodes / tokens / images (the paper's sums depend on the batch size).
- The contextual maps are computed in each model's own width (``softmax(F_s F_s^T / sqrt(D_s))`` vs
  ``softmax(F_t F_t^T / sqrt(D_t))``): both are N x N, no projection and no trainable parameter is
  involved, so the term cannot be satisfied by a projection head instead of the student's features.
  They use all tokens of each image by default (N^2 per image is cheap), or the sampled ones.
- Grids that differ (teacher 8x8, student 4x4) are average-pooled to the smaller one; ViT tokens
  (B, N, D) are read as a sqrt(N) x sqrt(N) grid when pooling is needed.

Cost per step (B images, N tokens each after pooling, S sampled, M = B*S nodes, widths D_s, D_t,
projection d): contextual ``B N^2 (D_s + D_t)`` multiply-adds and ``B N^2`` memory; kNN ``M^2 D_t``
(no gradient) and ``M^2`` memory; local ``M k (D_s + D_t)``; global ``M d (D_s + D_t) + M^2 d`` and
``M^2`` memory. Only the kNN and the InfoNCE logits are quadratic in ``B*S``.

Sampling is reproducible: a ``torch.Generator`` on the training device seeded from ``seed``; its state
is part of the module's ``state_dict`` (extra state), so a resumed run continues the same sequence.
Indices are drawn on the device (no host work, no copy); under data parallelism each rank keeps its
rows of the global micro-batch's draw. Nothing in ``forward`` reads a device value back.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext, DeviceGenerator
from kdrun.losses.base import LossTerm
from kdrun.losses.features import full_precision, to_float

# ----------------------------------------------------------------------------- tokens


def tokens_to_map(x: Tensor) -> Tensor:
    """(B, N, D) tokens on a square grid -> (B, D, r, r) map with ``r = sqrt(N)`` (row-major order)."""
    b, n, d = x.shape
    r = math.isqrt(n)
    if r * r != n:
        raise ValueError(f"TRG: {n} tokens are not a square grid; cannot pool or align them")
    return x.transpose(1, 2).reshape(b, d, r, r)


def token_grid(shape: tuple[int, ...] | torch.Size, patch_size: int = 1) -> tuple[int, int] | None:
    """The (rows, cols) grid of tokens that :func:`to_tokens` makes of an input of ``shape``.

    ``None`` for (B, N, D) tokens whose N is not a square (usable as they are, not poolable).
    Raises ValueError when the grid is not divisible by ``patch_size``.
    """
    shape = tuple(shape)
    if len(shape) == 4:
        h, w = shape[2], shape[3]
    elif len(shape) == 3:
        r = math.isqrt(shape[1])
        if r * r != shape[1]:
            if patch_size > 1:
                raise ValueError(f"TRG: patch_size {patch_size} needs a square token grid, got {shape[1]} tokens")
            return None
        h = w = r
    else:
        raise ValueError(f"TRG: inputs must be (B, C, H, W) feature maps or (B, N, D) tokens, got {shape}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"TRG: a {h}x{w} grid is not divisible by patch_size {patch_size}")
    return h // patch_size, w // patch_size


def token_width(shape: tuple[int, ...] | torch.Size) -> int:
    """Channels of a (B, C, H, W) map, or width D of (B, N, D) tokens."""
    return int(shape[1]) if len(shape) == 4 else int(shape[-1])


def to_tokens(x: Tensor, patch_size: int = 1, grid: tuple[int, int] | None = None) -> Tensor:
    """A feature map (B, C, H, W) or tokens (B, N, D) as tokens (B, N', D).

    ``patch_size`` p > 1 average-pools every p x p patch into one token; ``grid`` (rows, cols), when
    given and different from the grid after patching, adaptive-average-pools to it (grid alignment).
    A map's tokens are its positions in row-major order. Tokens that need neither come back as they are.
    """
    if x.dim() == 3:
        if patch_size == 1 and grid is None:
            return x
        m = tokens_to_map(x)
    elif x.dim() == 4:
        m = x
    else:
        raise ValueError(f"TRG: inputs must be (B, C, H, W) or (B, N, D), got {tuple(x.shape)}")
    if patch_size > 1:
        m = F.avg_pool2d(m, patch_size)
    if grid is not None and tuple(m.shape[-2:]) != tuple(grid):
        m = F.adaptive_avg_pool2d(m, grid)
    return m.flatten(2).transpose(1, 2)


def aligned_grid(student: tuple[int, ...] | torch.Size, teacher: tuple[int, ...] | torch.Size,
                 patch_size: int = 1) -> tuple[int, int] | None:
    """The common grid both inputs are pooled to (the smaller one per axis), or None when none is needed.

    Raises ValueError when the two cannot be aligned (different token counts without square grids).
    """
    gs, gt = token_grid(student, patch_size), token_grid(teacher, patch_size)
    if gs == gt:
        if gs is None and student[1] != teacher[1]:
            raise ValueError(f"TRG: student {tuple(student)} and teacher {tuple(teacher)} have different token counts "
                             f"and no square grid to align them on")
        return None
    if gs is None or gt is None:
        if gs is None and gt is None:
            raise ValueError(f"TRG: cannot align {tuple(student)} with {tuple(teacher)}")
        raise ValueError(f"TRG: student {tuple(student)} and teacher {tuple(teacher)}: a non-square token set "
                         f"cannot be aligned with a grid")
    return min(gs[0], gt[0]), min(gs[1], gt[1])


def aligned_tokens(student: Tensor, teacher: Tensor, patch_size: int = 1) -> tuple[Tensor, Tensor]:
    """Student and teacher tokens (B, N, D_s), (B, N, D_t) on the same grid (see :func:`aligned_grid`)."""
    grid = aligned_grid(student.shape, teacher.shape, patch_size)
    return to_tokens(student, patch_size, grid), to_tokens(teacher, patch_size, grid)


# ----------------------------------------------------------------------------- sampling


class TokenSampler(nn.Module):
    """Draws the same random token positions for teacher and student: ``S`` distinct positions per image.

    ``forward(batch, num_tokens, device)`` returns (B, S) indices (sorted within each image), one
    independent draw per image; :meth:`gather` picks them from (B, N, D) tokens in one vectorised
    gather. With ``num_samples=None`` (or ``>= num_tokens``) every token is kept and nothing is drawn.

    The draws come from the sampler's own ``torch.Generator`` on the training device, seeded with
    ``seed``: no host work and no host-to-device copy per step. Under data parallelism (``layout``:
    each rank's share of the global micro-batch) every rank draws for the whole global micro-batch and
    keeps its own rows, so the images of all ranks get independent draws, as in one process with the
    global batch. The generator's state is saved in ``state_dict()`` (the module's extra state), so
    loading a checkpoint continues the sequence; a checkpoint of another device type (CPU vs CUDA
    generators) continues with a sequence seeded from ``(seed, draws)``.

    Args:
        num_samples: tokens drawn per image (S). Not given in the paper's available text; chosen: 16
            (a quarter of a CIFAR ResNet's 8x8 grid).
        seed: seed of the generator.
    """

    def __init__(self, num_samples: int | None = 16, seed: int = 0) -> None:
        super().__init__()
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"TokenSampler: num_samples must be positive or None, got {num_samples}")
        self.num_samples = None if num_samples is None else int(num_samples)
        self.random = DeviceGenerator(seed)

    @property
    def seed(self) -> int:
        return self.random.seed

    def samples_per_image(self, num_tokens: int) -> int:
        return num_tokens if self.num_samples is None else min(self.num_samples, num_tokens)

    def forward(self, batch: int, num_tokens: int, device: torch.device | str = "cpu",  # type: ignore[override]
                layout: tuple[tuple[int, ...], int] | None = None) -> Tensor:
        s = self.samples_per_image(num_tokens)
        device = torch.device(device)
        if s == num_tokens:
            return torch.arange(num_tokens, device=device).expand(batch, num_tokens)
        rows, first = batch, 0
        if layout is not None:  # the global micro-batch's draw; this rank's rows of it
            sizes, rank = layout
            rows, first = sum(sizes), sum(sizes[:rank])
        keys = torch.rand(rows, num_tokens, generator=self.random.draw(device), device=device)[first:first + batch]
        return keys.topk(s, dim=1).indices.sort(dim=1).values

    @staticmethod
    def gather(x: Tensor, idx: Tensor) -> Tensor:
        """(B, N, D) tokens at (B, S) positions -> (B, S, D)."""
        return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def get_extra_state(self) -> dict[str, Any]:
        return self.random.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.random.load_state_dict(state)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, seed={self.seed}"


# ----------------------------------------------------------------------------- graph


class TokenGraph(NamedTuple):
    """A kNN graph: ``indices`` (..., M, k) neighbours of every node, ``weights`` (..., M, k) Gaussian
    edge weights ``exp(-d^2 / (2 sigma))``, ``sq_dists`` (..., M, k) the squared distances ``d^2``."""

    indices: Tensor
    weights: Tensor
    sq_dists: Tensor


@torch.no_grad()
def knn_indices(x: Tensor, k: int) -> Tensor:
    """The ``k`` nearest other nodes (Euclidean) of every node of ``x`` (..., M, D) -> (..., M, k).

    Neighbours are sorted by distance; a node is never its own neighbour. One ``torch.cdist`` and one
    ``topk`` (M^2 memory per graph), no gradient.
    """
    m = x.shape[-2]
    if not 1 <= k < m:
        raise ValueError(f"TRG: k must be in [1, {m - 1}] for {m} nodes, got {k}")
    d = torch.cdist(x, x)
    d.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def neighbour_sq_dists(x: Tensor, idx: Tensor) -> Tensor:
    """``||x_i - x_j||^2`` for every node i of ``x`` (..., M, D) and its neighbours j = ``idx`` (..., M, k).

    Differentiable; ``M k D`` work and memory (one flat ``index_select``)."""
    *lead, m, d = x.shape
    k = idx.shape[-1]
    g = math.prod(lead)
    xf = x.reshape(g, m, d)
    offset = (torch.arange(g, device=x.device) * m).view(g, 1, 1)
    nb = xf.reshape(g * m, d).index_select(0, (idx.reshape(g, m, k) + offset).reshape(-1)).view(g, m, k, d)
    return (xf.unsqueeze(2) - nb).pow(2).sum(-1).view(*lead, m, k)


def gaussian_kernel(sq_dists: Tensor, sigma: float) -> Tensor:
    """Edge weights ``exp(-d^2 / (2 sigma))`` (the paper's kernel, with sigma dividing d^2 unsquared)."""
    return torch.exp(-sq_dists / (2.0 * sigma))


def build_token_graph(x: Tensor, k: int, sigma: float, indices: Tensor | None = None) -> TokenGraph:
    """kNN graph with Gaussian weights over the nodes of ``x`` (..., M, D); one graph per leading index.

    ``indices`` reuses given neighbourhoods (e.g. the teacher's for the student graph) instead of
    searching ``x``'s own.
    """
    idx = knn_indices(x.detach(), k) if indices is None else indices
    sq = neighbour_sq_dists(x, idx)
    return TokenGraph(idx, gaussian_kernel(sq, sigma), sq)


# ----------------------------------------------------------------------------- loss functions


def _graph_nodes(tokens: Tensor, graph: str) -> Tensor:
    """(B, S, D) sampled tokens -> nodes: (B*S, D) for one batch graph, (B, S, D) for a graph per image."""
    if graph == "batch":
        return tokens.reshape(-1, tokens.shape[-1])
    if graph == "image":
        return tokens
    raise ValueError(f"TRG: graph must be 'batch' or 'image', got '{graph}'")


def local_preserving_loss(student: Tensor, teacher: Tensor, k: int = 8, sigma: float = 1.0,
                          normalize: bool = True, logits: str = "kernel", graph: str = "batch") -> Tensor:
    """Local preserving loss on sampled tokens (B, S, D_s), (B, S, D_t).

    The teacher's kNN graph fixes every node's neighbourhood N(i) (k nodes); both models' Gaussian edge
    weights ``A_ij`` over N(i) become distributions ``P(j | i) = softmax_{j in N(i)}(l_ij)`` with
    ``l_ij = A_ij`` (``logits="kernel"``, the paper's formula as reported) or ``l_ij = -d_ij^2 / (2 sigma)``
    (``logits="log_kernel"``, i.e. ``A_ij / sum_N(i) A``). Returns ``mean_i KL(P_T(.|i) || P_S(.|i))``.
    ``k`` is capped at the number of other nodes; with fewer than 2 nodes the loss is 0.
    """
    if logits not in ("kernel", "log_kernel"):
        raise ValueError(f"TRG: logits must be 'kernel' or 'log_kernel', got '{logits}'")
    s, t = _graph_nodes(student, graph), _graph_nodes(teacher, graph)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    k = min(k, s.shape[-2] - 1)
    if k < 1:
        return student.sum() * 0.0
    g_t = build_token_graph(t, k, sigma)
    g_s = build_token_graph(s, k, sigma, indices=g_t.indices)
    if logits == "kernel":
        l_t, l_s = g_t.weights, g_s.weights
    else:
        l_t, l_s = -g_t.sq_dists / (2.0 * sigma), -g_s.sq_dists / (2.0 * sigma)
    log_pt = F.log_softmax(l_t, dim=-1)
    log_ps = F.log_softmax(l_s, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def global_infonce_loss(z_student: Tensor, z_teacher: Tensor, temperature: float) -> Tensor:
    """InfoNCE over M projected tokens (M, d): anchor ``z_s,i``, positive ``z_t,i``, negatives ``z_t,j != i``.

    ``-mean_i log( exp(cos(z_s,i, z_t,i) / tau) / sum_j exp(cos(z_s,i, z_t,j) / tau) )``: cosine
    similarity (SIM is not defined in the paper's available text; cosine chosen, as in CRD/SimCLR).
    """
    zs = F.normalize(z_student, dim=-1)
    zt = F.normalize(z_teacher, dim=-1)
    logits = zs @ zt.t() / temperature
    return F.cross_entropy(logits, torch.arange(zs.shape[0], device=zs.device))


def contextual_map(x: Tensor) -> Tensor:
    """Per-image token attention map ``softmax(F F^T / sqrt(D))``: (B, N, D) -> (B, N, N)."""
    return torch.softmax(x @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)


def contextual_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``MSE(CS_S, CS_T)`` (mean over B x N x N entries), each map in its model's own width."""
    return F.mse_loss(contextual_map(student), contextual_map(teacher))


def temperature_at(epoch: int, total_epochs: int, start: float, end: float, schedule: str = "cosine") -> float:
    """The global loss's temperature at (0-based) ``epoch``: ``start`` at the first epoch, ``end`` at the last.

    ``p = epoch / (total_epochs - 1)``; ``cosine``: ``end + (start - end) (1 + cos(pi p)) / 2``;
    ``linear``: ``start + (end - start) p``; ``constant``: ``start``. The paper lowers the temperature
    during training; the form and end points of its schedule were not found (chosen: cosine).
    """
    if schedule == "constant" or total_epochs <= 1:
        return float(start)
    p = min(max(epoch / (total_epochs - 1), 0.0), 1.0)
    if schedule == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))
    if schedule == "linear":
        return float(start + (end - start) * p)
    raise ValueError(f"TRG: schedule must be 'cosine', 'linear' or 'constant', got '{schedule}'")


# ----------------------------------------------------------------------------- loss terms


class _TokenTerm(LossTerm):
    """Shared parts: tokenising and aligning the inputs, checking their shapes, the token sampler."""

    name = "TRG"

    def __init__(self, patch_size: int = 1, num_samples: int | None = 16, seed: int = 0) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"{self.name}: patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)
        self.sampler = TokenSampler(num_samples, seed)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        for arg, shape in (("student", student), ("teacher", teacher)):
            if len(shape) not in (3, 4):
                raise ValueError(f"{self.name}: '{arg}' must be a (B, C, H, W) feature map or (B, N, D) tokens, "
                                 f"got {tuple(shape)}")
        if student[0] != teacher[0]:
            raise ValueError(f"{self.name}: 'student' {tuple(student)} and 'teacher' {tuple(teacher)} have different "
                             f"batch sizes")
        aligned_grid(student, teacher, self.patch_size)  # raises when they cannot be aligned

    def tokens(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Aligned float tokens (B, N, D_s) and (B, N, D_t); the teacher's carry no gradient."""
        return aligned_tokens(to_float(student), to_float(teacher).detach(), self.patch_size)

    def sample(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The same S random positions of every image from both: (B, S, D_s), (B, S, D_t)."""
        if self.sampler.samples_per_image(s.shape[1]) == s.shape[1]:
            return s, t  # every token kept: nothing to draw or gather
        idx = self.sampler(s.shape[0], s.shape[1], s.device, self.spread_layout())
        return self.sampler.gather(s, idx), self.sampler.gather(t, idx)


class TRGLocalLoss(_TokenTerm):
    """TRG's local preserving loss (see the module docstring and :func:`local_preserving_loss`).

    Inputs ``student``, ``teacher``: feature maps (B, C, H, W) or tokens (B, N, D); widths may differ.
    Per step: tokenise (optional p x p patch pooling, grid alignment), sample S tokens per image (same
    positions in both), build the teacher's kNN graph over the sampled tokens, match the neighbour
    distributions with KL.

    Args (none of these values was found in the paper's available text; all defaults chosen):
        k: neighbours per node (chosen: 8).
        sigma: kernel width in ``exp(-d^2 / (2 sigma))`` (chosen: 1.0, for L2-normalised tokens, where
            ``d^2`` lies in [0, 4]).
        num_samples: tokens sampled per image (chosen: 16). patch_size: p (chosen: 1).
        normalize: L2-normalise tokens before the graph (chosen: True; see the module docstring).
        logits: ``kernel`` (softmax of the weights ``A_ij``, the formula as reported) or ``log_kernel``.
        graph: ``batch`` (one graph over all sampled tokens) or ``image`` (one per image).
        seed: sampler seed.
    """

    name = "TRG-local"

    def __init__(self, k: int = 8, sigma: float = 1.0, num_samples: int | None = 16, patch_size: int = 1,
                 normalize: bool = True, logits: str = "kernel", graph: str = "batch", seed: int = 0) -> None:
        super().__init__(patch_size, num_samples, seed)
        _check_graph_args(self.name, k, sigma, logits, graph)
        self.k, self.sigma, self.normalize = int(k), float(sigma), bool(normalize)
        self.logits, self.graph = logits, graph

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        with full_precision(student):
            s, t = self.sample(*self.tokens(student, teacher))
            return local_preserving_loss(s, t, self.k, self.sigma, self.normalize, self.logits, self.graph)

    def extra_repr(self) -> str:
        return (f"k={self.k}, sigma={self.sigma}, patch_size={self.patch_size}, normalize={self.normalize}, "
                f"logits={self.logits}, graph={self.graph}")


class TRGGlobalLoss(_TokenTerm):
    """TRG's global topology loss: InfoNCE between projected student and teacher tokens, scheduled temperature.

    Sampled tokens of the whole batch (M = B x S) are projected by two trainable linear heads
    (``D_s -> proj_dim`` and ``D_t -> proj_dim``, created in :meth:`setup`; trained with the student,
    never exported), and scored with :func:`global_infonce_loss`. The teacher's head sees detached
    teacher tokens: gradients reach the heads and the student, never the teacher.

    The temperature follows :func:`temperature_at` from ``tau_start`` (epoch 0) to ``tau_end`` (last
    epoch); :meth:`on_epoch_start` updates it at the start of every epoch (``tau_start`` until then).

    Args (values not found in the paper's available text; all defaults chosen):
        proj_dim: projection width (chosen: 128, CRD's embedding size).
        tau_start, tau_end: temperature at the first and last epoch (chosen: 0.5 and 0.1).
        schedule: ``cosine`` (chosen), ``linear`` or ``constant``.
        num_samples, patch_size, seed: as in :class:`TRGLocalLoss`.
    """

    name = "TRG-global"

    def __init__(self, proj_dim: int = 128, tau_start: float = 0.5, tau_end: float = 0.1, schedule: str = "cosine",
                 num_samples: int | None = 16, patch_size: int = 1, seed: int = 0) -> None:
        super().__init__(patch_size, num_samples, seed)
        _check_tau_args(self.name, proj_dim, tau_start, tau_end, schedule)
        self.proj_dim = int(proj_dim)
        self.tau_start, self.tau_end, self.schedule = float(tau_start), float(tau_end), schedule
        self.temperature = self.tau_start
        self.head_s: nn.Linear | None = None
        self.head_t: nn.Linear | None = None

    def setup(self, ctx: BuildContext) -> None:
        shapes = ctx.shapes
        self.head_s = nn.Linear(token_width(shapes["student"]), self.proj_dim)
        self.head_t = nn.Linear(token_width(shapes["teacher"]), self.proj_dim)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        super().check_shapes(student, teacher)
        _check_heads(self.name, self.head_s, self.head_t, student, teacher)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.temperature = temperature_at(epoch, total_epochs, self.tau_start, self.tau_end, self.schedule)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        if self.head_s is None or self.head_t is None:
            raise RuntimeError(f"{self.name}: the projection heads do not exist yet: call setup(ctx) first")
        with full_precision(student):
            s, t = self.sample(*self.tokens(student, teacher))
            zs = self.head_s(s.reshape(-1, s.shape[-1]))
            zt = self.head_t(t.reshape(-1, t.shape[-1]))
            return global_infonce_loss(zs, zt, self.temperature)

    def extra_repr(self) -> str:
        return (f"proj_dim={self.proj_dim}, tau={self.tau_start}->{self.tau_end} ({self.schedule}), "
                f"temperature={self.temperature:.4g}, patch_size={self.patch_size}")


class TRGContextualLoss(_TokenTerm):
    """TRG's token-wise contextual loss ``MSE(softmax(F_s F_s^T / sqrt(D_s)), softmax(F_t F_t^T / sqrt(D_t)))``.

    Per image, over all its N tokens (``num_samples=None``, the default: N^2 per image is cheap) or over
    S sampled ones. No trainable parameter. Args: patch_size, num_samples, seed as in
    :class:`TRGLocalLoss`.
    """

    name = "TRG-contextual"

    def __init__(self, patch_size: int = 1, num_samples: int | None = None, seed: int = 0) -> None:
        super().__init__(patch_size, num_samples, seed)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        with full_precision(student):
            s, t = self.sample(*self.tokens(student, teacher))
            return contextual_loss(s, t)


class TRGLoss(_TokenTerm):
    """All three TRG terms on one tokenisation and one sampling: ``{"contextual": alpha L_inner,
    "local": beta L_local, "global": gamma L_global}`` (already weighted; the engine sums the parts).

    Use it with cross-entropy and KD terms for the paper's objective
    ``CE + KD + alpha L_inner + beta L_local + gamma L_global``; give it ``weight: 1``.

    Args (the paper's values were not found in its available text; all defaults chosen):
        alpha, beta, gamma: weights of the contextual, local and global terms (chosen: 1.0 each). The
            raw parts differ by orders of magnitude: on unrelated random post-ReLU 256 x 8 x 8 maps
            (B = 64, defaults) contextual ~7e-4, local ~3e-4 (``kernel``) or ~1e-3 (``log_kernel``),
            global ~log(B x S) = 6.9; recipes must set the weights (the paper's values were not found).
        k, sigma, normalize, local_logits, graph: the local term (see :class:`TRGLocalLoss`).
        proj_dim, tau_start, tau_end, schedule: the global term (see :class:`TRGGlobalLoss`).
        num_samples: tokens sampled per image for the graph and the InfoNCE (chosen: 16).
        contextual_sampled: compute the contextual maps on the sampled tokens only (default False: on
            all tokens of each image).
        patch_size, seed: as in :class:`TRGLocalLoss`.
    """

    name = "TRG"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0, k: int = 8, sigma: float = 1.0,
                 num_samples: int | None = 16, patch_size: int = 1, proj_dim: int = 128, tau_start: float = 0.5,
                 tau_end: float = 0.1, schedule: str = "cosine", normalize: bool = True, local_logits: str = "kernel",
                 graph: str = "batch", contextual_sampled: bool = False, seed: int = 0) -> None:
        super().__init__(patch_size, num_samples, seed)
        _check_graph_args(self.name, k, sigma, local_logits, graph)
        _check_tau_args(self.name, proj_dim, tau_start, tau_end, schedule)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.k, self.sigma, self.normalize = int(k), float(sigma), bool(normalize)
        self.local_logits, self.graph = local_logits, graph
        self.proj_dim = int(proj_dim)
        self.tau_start, self.tau_end, self.schedule = float(tau_start), float(tau_end), schedule
        self.temperature = self.tau_start
        self.contextual_sampled = bool(contextual_sampled)
        self.head_s: nn.Linear | None = None
        self.head_t: nn.Linear | None = None

    def setup(self, ctx: BuildContext) -> None:
        shapes = ctx.shapes
        self.head_s = nn.Linear(token_width(shapes["student"]), self.proj_dim)
        self.head_t = nn.Linear(token_width(shapes["teacher"]), self.proj_dim)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        super().check_shapes(student, teacher)
        _check_heads(self.name, self.head_s, self.head_t, student, teacher)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.temperature = temperature_at(epoch, total_epochs, self.tau_start, self.tau_end, self.schedule)

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        if self.head_s is None or self.head_t is None:
            raise RuntimeError(f"{self.name}: the projection heads do not exist yet: call setup(ctx) first")
        with full_precision(student):
            s, t = self.tokens(student, teacher)
            ss, ts = self.sample(s, t)
            ctx = contextual_loss(ss, ts) if self.contextual_sampled else contextual_loss(s, t)
            loc = local_preserving_loss(ss, ts, self.k, self.sigma, self.normalize, self.local_logits, self.graph)
            zs = self.head_s(ss.reshape(-1, ss.shape[-1]))
            zt = self.head_t(ts.reshape(-1, ts.shape[-1]))
            glo = global_infonce_loss(zs, zt, self.temperature)
        return {"contextual": self.alpha * ctx, "local": self.beta * loc, "global": self.gamma * glo}

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, k={self.k}, sigma={self.sigma}, "
                f"patch_size={self.patch_size}, proj_dim={self.proj_dim}, tau={self.tau_start}->{self.tau_end} "
                f"({self.schedule}), temperature={self.temperature:.4g}, graph={self.graph}")


# ----------------------------------------------------------------------------- argument checks


def _check_graph_args(name: str, k: int, sigma: float, logits: str, graph: str) -> None:
    if k < 1:
        raise ValueError(f"{name}: k must be >= 1, got {k}")
    if sigma <= 0:
        raise ValueError(f"{name}: sigma must be positive, got {sigma}")
    if logits not in ("kernel", "log_kernel"):
        raise ValueError(f"{name}: logits must be 'kernel' or 'log_kernel', got '{logits}'")
    if graph not in ("batch", "image"):
        raise ValueError(f"{name}: graph must be 'batch' or 'image', got '{graph}'")


def _check_tau_args(name: str, proj_dim: int, tau_start: float, tau_end: float, schedule: str) -> None:
    if proj_dim < 1:
        raise ValueError(f"{name}: proj_dim must be >= 1, got {proj_dim}")
    if tau_start <= 0 or tau_end <= 0:
        raise ValueError(f"{name}: temperatures must be positive, got {tau_start}, {tau_end}")
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"{name}: schedule must be 'cosine', 'linear' or 'constant', got '{schedule}'")


def _check_heads(name: str, head_s: nn.Linear | None, head_t: nn.Linear | None,
                 student: torch.Size, teacher: torch.Size) -> None:
    for arg, head, shape in (("student", head_s, student), ("teacher", head_t, teacher)):
        if head is not None and head.in_features != token_width(shape):
            raise ValueError(f"{name}: the {arg} head takes width {head.in_features} but '{arg}' {tuple(shape)} "
                             f"has width {token_width(shape)}")


__all__ = [
    "TRGContextualLoss", "TRGGlobalLoss", "TRGLocalLoss", "TRGLoss", "TokenGraph", "TokenSampler",
    "aligned_grid", "aligned_tokens", "build_token_graph", "contextual_loss", "contextual_map",
    "gaussian_kernel", "global_infonce_loss", "knn_indices", "local_preserving_loss", "neighbour_sq_dists",
    "temperature_at", "to_tokens", "token_grid", "tokens_to_map",
]
