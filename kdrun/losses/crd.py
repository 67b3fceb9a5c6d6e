"""Contrastive representation distillation (CRD), with its embedding heads and memory banks."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext, DeviceGenerator, gather_rows
from kdrun.losses.base import LossTerm
from kdrun.losses.features import full_precision, to_float


class CRDEmbed(nn.Module):
    """Flatten, one linear layer, L2-normalise each row: ``(B, ...) -> (B, out_features)`` on the unit sphere.

    RepDistiller's ``Embed`` (the CRD heads ``g_S`` and ``g_T``)."""

    def __init__(self, in_features: int, out_features: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(LossTerm):
    """Contrastive representation distillation, Tian, Krishnan & Isola, "Contrastive Representation
    Distillation", ICLR 2020, as implemented in RepDistiller (the code behind the paper's CIFAR-100 tables).

    Both models' features are embedded on the unit sphere by trainable heads,
    ``e_s = normalize(W_s s + b_s)`` and ``e_t = normalize(W_t t + b_t)`` (``feat_dim`` = 128). Two memory
    banks ``M_s``, ``M_t`` (``num_train x feat_dim`` buffers) hold a slowly moving embedding of every
    training sample, one per model. For sample ``i`` of the batch (dataset index ``y_i``) the term draws
    ``K`` negative indices ``j_1..j_K`` and sets ``j_0 = y_i`` (the positive: the *same* sample, read from
    the *other* model's bank). Two symmetric NCE problems follow:

    - student anchor: ``h_ik = exp(<e_s,i, M_t[j_k]> / tau) / Z_s``;
    - teacher anchor: ``h'_ik = exp(<e_t,i, M_s[j_k]> / tau) / Z_t``;

    each scored with the NCE loss of a data-vs-noise classifier with uniform noise ``P_n = 1 / N``::

        L = -1/B sum_i [ log(h_i0 / (h_i0 + K P_n + eps)) + sum_{k>=1} log(K P_n / (h_ik + K P_n + eps)) ]

    The partition constants ``Z_s = N * mean(exp-scores)`` and ``Z_t`` are estimated on the first training
    batch and then kept fixed (buffers, checkpointed), as the reference does. After the loss is computed,
    both banks move toward the new embeddings at the batch's rows:
    ``M[y_i] <- normalize(m M[y_i] + (1 - m) e_i)`` (vectorised ``index_copy_``, no gradient). The banks
    start uniform in ``[-1/sqrt(d/3), 1/sqrt(d/3)]`` like the reference. Banks, partition constants and the
    label table below update only in training mode.

    Returns ``{"student_anchor": L_s, "teacher_anchor": L_t}`` (the reference's ``s_loss + t_loss``).

    Negatives. Each row's K negatives are distinct, drawn uniformly without replacement as the
    reference's data set does (``np.random.choice(..., replace=False)``; with replacement only when a row
    has fewer than K candidates, the reference's rule too): the K largest of N uniform keys per row, on
    the device (``O(B N)`` work, rows chunked so that at most 16M keys exist at once). They come from the
    term's own generator: seeded with the run's ``seed``, identical on every rank, saved in the module's
    state (extra state) so that a resumed run draws the same negatives. Without ``target`` they are drawn
    from all ``N`` training indices. With ``target`` (class indices) they exclude samples of the
    anchor's class, which is RepDistiller's ``exact`` mode (the data set behind the published table
    draws its negatives from other classes). The term learns the classes of the training samples from
    ``(index, target)`` of the batches it sees (a ``labels`` buffer, ``-1`` = not seen yet; samples not
    seen yet count as other-class), so the exclusion is exact from the second epoch on, or from the first
    step when the data set's training labels reach :meth:`setup` through its build context (arrays, and
    Dataset folders whose datasets list ``targets``). Same-class samples get the lowest key, so the top K
    are other-class whenever a row has K of them; a row with fewer draws with replacement, vectorised:
    sorting the label table puts each class in one block, and a draw uniform over the ``N - n_c``
    positions outside the anchor's block is mapped around it. Difference to the reference data set: the
    positive is always the sample itself (its ``exact`` mode; ``relax`` is not provided).

    Paper vs code: the paper's critic compares the current teacher and student embeddings of the
    positive pair; the code (and this term) reads the positive from the other model's memory bank.

    Args:
        feat_dim: embedding size (default 128).
        num_negatives: K (default 16384, the CIFAR-100 setting).
        temperature: tau (default 0.07).
        momentum: m of the memory update (default 0.5).
        eps: the 1e-7 in the NCE loss.

    CIFAR-100 table of the CRD paper (RepDistiller ``--distill crd -a 0 -b 0.8``): weight 0.8 on the
    pooled features (``feat``), cross-entropy weight 1, no KD term (the "CRD+KD" row adds KD with weight
    1). Inputs: ``student``, ``teacher``: (B, D) (or (B, ...), flattened); ``index``: ``batch.index``;
    optional ``target``: ``batch.target`` (same-class exclusion, as the published runs).
    """

    def __init__(self, feat_dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, eps: float = 1e-7) -> None:
        super().__init__()
        if feat_dim <= 0 or num_negatives <= 0:
            raise ValueError(f"CRD: feat_dim and num_negatives must be positive, got {feat_dim}, {num_negatives}")
        if temperature <= 0:
            raise ValueError(f"CRD: temperature must be positive, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"CRD: momentum must be in [0, 1), got {momentum}")
        self.feat_dim = int(feat_dim)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.num_train = 0
        self.embed_s: CRDEmbed | None = None
        self.embed_t: CRDEmbed | None = None
        # buffers, sized in setup(); None (and absent from state_dict) until then
        self.memory_s: Tensor | None
        self.memory_t: Tensor | None
        self.z_s: Tensor | None
        self.z_t: Tensor | None
        self.labels: Tensor | None
        for name in ("memory_s", "memory_t", "z_s", "z_t", "labels"):
            self.register_buffer(name, None)
        self.random = DeviceGenerator()  # the negatives' generator, seeded with the run's seed in setup
        self._rows_full = False  # every row has K other-class candidates (known when setup gets the labels)

    # ------------------------------------------------------------------------------ build time
    def setup(self, ctx: BuildContext) -> None:
        """Create the heads (from the input widths), the two memory banks and the partition constants;
        with a ``target`` input also the label table (filled from ``ctx.train_labels`` when known)."""
        shapes, num_train, train_labels = ctx.shapes, ctx.num_train, ctx.train_labels
        if num_train < 2:
            raise ValueError(f"CRD: needs at least 2 training samples, got num_train={num_train}")
        ds = math.prod(tuple(shapes["student"])[1:])
        dt = math.prod(tuple(shapes["teacher"])[1:])
        self.num_train = int(num_train)
        self.random = DeviceGenerator(ctx.seed)
        self.embed_s = CRDEmbed(ds, self.feat_dim)
        self.embed_t = CRDEmbed(dt, self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
        self.register_buffer("memory_s", torch.rand(num_train, self.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(num_train, self.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        if "target" in shapes:
            labels = torch.full((num_train,), -1, dtype=torch.long)
            if train_labels is not None:
                if tuple(train_labels.shape) != (num_train,):
                    raise ValueError(f"CRD: train_labels {tuple(train_labels.shape)} must be ({num_train},)")
                labels.copy_(train_labels.long())
                # known on the host: every row has K other-class candidates, so no row needs the fallback draw
                self._rows_full = num_train - int(torch.bincount(labels).max()) >= self.num_negatives
            self.register_buffer("labels", labels)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, index: torch.Size,  # type: ignore[override]
                     target: torch.Size | None = None) -> None:
        if len(student) < 2 or len(teacher) < 2 or student[0] != teacher[0]:
            raise ValueError(f"CRD: 'student' {tuple(student)} and 'teacher' {tuple(teacher)} must be (batch, ...) "
                             f"features with the same batch size")
        if tuple(index) != (student[0],):
            raise ValueError(f"CRD: 'index' {tuple(index)} must be the (batch,) sample indices of the training set "
                             f"(batch.index) for features {tuple(student)}")
        if target is not None and tuple(target) != (student[0],):
            raise ValueError(f"CRD: 'target' {tuple(target)} must be (batch,) class indices for features "
                             f"{tuple(student)} (soft targets cannot exclude same-class negatives)")
        for name, head, shape in (("student", self.embed_s, student), ("teacher", self.embed_t, teacher)):
            width = math.prod(tuple(shape)[1:])
            if head is not None and head.linear.in_features != width:
                raise ValueError(f"CRD: the {name} head takes {head.linear.in_features} features but '{name}' has "
                                 f"shape {tuple(shape)}")

    # ------------------------------------------------------------------------------ pieces
    def sample_indices(self, index: Tensor, target: Tensor | None = None) -> Tensor:
        """(B, K + 1) bank rows: column 0 the sample itself, then K negatives (see the class docstring)."""
        n, k, b = self.num_train, self.num_negatives, index.shape[0]
        dev = index.device
        # evaluation mode changes no state: its draws come from a fresh generator of the same seed
        gen = self.random.draw(dev) if self.training else torch.Generator(device=dev).manual_seed(self.random.seed)
        if target is None or self.labels is None:
            if k > n:  # more negatives than samples: with replacement, as the reference then does
                neg = torch.randint(0, n, (b, k), device=dev, generator=gen)
            else:
                neg = self._distinct(b, gen, dev)
        elif self._rows_full:
            neg = self._distinct(b, gen, dev, target.long())
        else:
            y = target.long()
            # a row with fewer than K other-class samples draws K of them with replacement (the reference's rule)
            sorted_labels, order = torch.sort(self.labels, stable=True)
            lo = torch.searchsorted(sorted_labels, y, right=False)
            n_same = torch.searchsorted(sorted_labels, y, right=True) - lo
            n_other = n - n_same
            degenerate = n_other <= 0  # every known sample is of this class: fall back to uniform draws
            n_same = torch.where(degenerate, torch.zeros_like(n_same), n_same)
            n_other = torch.where(degenerate, torch.full_like(n_other, n), n_other)
            r = torch.randint(0, 2**62, (b, k), device=dev, generator=gen) % n_other.unsqueeze(1)
            pos = r + (r >= lo.unsqueeze(1)).long() * n_same.unsqueeze(1)
            neg = order[pos]
            if k <= n:
                neg = torch.where((n_other < k).unsqueeze(1), neg, self._distinct(b, gen, dev, y))
        return torch.cat([index.long().unsqueeze(1), neg], dim=1)

    ROW_CHUNK = 1 << 24  # random keys per chunk of rows in _distinct (64 MiB of float32)

    def _distinct(self, b: int, gen: torch.Generator, dev: torch.device, target: Tensor | None = None) -> Tensor:
        """(B, K) negatives without repeats within a row: the K largest of N uniform keys per row (with
        ``target``, same-class samples get key -1, so they come last). Memory: at most ``ROW_CHUNK`` keys at
        a time (rows in chunks; one chunk for CIFAR-100's 64 x 50,000)."""
        n, k = self.num_train, min(self.num_negatives, self.num_train)
        rows = max(1, self.ROW_CHUNK // n)
        out = []
        for first in range(0, b, rows):
            count = min(rows, b - first)
            keys = torch.rand(count, n, device=dev, generator=gen)
            if target is not None:
                same = self.labels.unsqueeze(0) == target[first:first + count].unsqueeze(1)
                keys = keys.masked_fill(same, -1.0)
            out.append(keys.topk(k, dim=1, sorted=False).indices)
        return torch.cat(out) if len(out) > 1 else out[0]

    def get_extra_state(self) -> dict[str, Any]:
        return self.random.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.random.load_state_dict(state)

    def nce_loss(self, x: Tensor) -> Tensor:
        """NCE loss of (B, K + 1) normalised scores, positive in column 0 (RepDistiller's ``ContrastLoss``)."""
        b, k = x.shape[0], x.shape[1] - 1
        noise = k / float(self.num_train)
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + self.eps))
        log_d0 = torch.log(noise / (x[:, 1:] + noise + self.eps))
        return -(log_d1.sum() + log_d0.sum()) / b

    @torch.no_grad()
    def _update_memory(self, memory: Tensor, index: Tensor, e: Tensor) -> None:
        rows = memory.index_select(0, index) * self.momentum + e.detach() * (1.0 - self.momentum)
        memory.index_copy_(0, index, F.normalize(rows, dim=1))

    def forward(self, student: Tensor, teacher: Tensor, index: Tensor,  # type: ignore[override]
                target: Tensor | None = None) -> dict[str, Tensor]:
        """Under data parallelism (``on_batch`` said the micro-batch spans several ranks) every rank
        gathers the global micro-batch's indices, labels and (detached) embeddings: it draws the
        negatives of the whole micro-batch as one process would (the ranks' generators agree) and keeps
        its own rows, takes the partition constants from the global mean, and updates the label table
        and both banks with every rank's rows, so that the banks stay identical on all ranks and equal
        to one process's with the global batch."""
        if self.embed_s is None or self.embed_t is None or self.memory_s is None or self.memory_t is None:
            raise RuntimeError("CRD: the heads and memory banks do not exist yet: call setup(ctx) first")
        if target is not None and self.labels is None:
            raise RuntimeError("CRD: got 'target' but setup() was called without it; pass it in the setup shapes")
        index = index.long()
        layout = self.spread_layout()
        spread = layout is not None
        gather = (lambda x: gather_rows(x, layout[0])) if spread else (lambda x: x)  # noqa: E731
        all_index = gather(index)
        all_target = gather(target.long()) if target is not None else None
        with full_precision(student):
            e_s = self.embed_s(to_float(student))
            e_t = self.embed_t(to_float(teacher).detach())
            if target is not None and self.training:
                self.labels.index_copy_(0, all_index, all_target.long())
            idx = self.sample_indices(all_index, all_target)
            if spread:  # this rank's rows of the global draw
                sizes, rank = layout
                idx = idx[sum(sizes[:rank]):sum(sizes[:rank + 1])]
            b, k1 = idx.shape
            w_t = self.memory_t.index_select(0, idx.flatten()).view(b, k1, -1)
            w_s = self.memory_s.index_select(0, idx.flatten()).view(b, k1, -1)
            out_s = torch.exp(torch.bmm(w_t, e_s.unsqueeze(2)).squeeze(2) / self.temperature)
            out_t = torch.exp(torch.bmm(w_s, e_t.unsqueeze(2)).squeeze(2) / self.temperature)
            mean_s, mean_t = out_s.detach().mean(), out_t.detach().mean()
            if spread:  # the global batch's mean: every rank's sum over all of its rows' scores
                sums = torch.stack([out_s.detach().sum(), out_t.detach().sum()])
                torch.distributed.all_reduce(sums)
                mean_s, mean_t = sums / (sum(layout[0]) * k1)
            z_s = torch.where(self.z_s < 0, mean_s * self.num_train, self.z_s)
            z_t = torch.where(self.z_t < 0, mean_t * self.num_train, self.z_t)
            loss_s = self.nce_loss(out_s / z_s)
            loss_t = self.nce_loss(out_t / z_t)
            if self.training:
                with torch.no_grad():
                    self.z_s.copy_(z_s)
                    self.z_t.copy_(z_t)
                self._update_memory(self.memory_s, all_index, gather(e_s.detach()))
                self._update_memory(self.memory_t, all_index, gather(e_t.detach()))
        return {"student_anchor": loss_s, "teacher_anchor": loss_t}

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
                f"momentum={self.momentum}, num_train={self.num_train}")


__all__ = ["CRDEmbed", "CRDLoss"]
