"""Data sets of named tensors (token ids, masks, labels, precomputed features): every field holds the
samples along dim 0, and a batch is ``{field: tensor[idx]}`` plus ``index``, served as ``batch.<field>``.

Models read the fields they need through their ``inputs`` (``{input_ids: batch.input_ids}``); loss
terms read any of them. The loader shuffles with a generator seeded by (seed, epoch key), like the
array loader, so that the order is a pure function of the seed and resume is exact.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdrun.data.arrays import shard_sizes
from kdrun.data.subsets import class_coverage, stratified_indices
from kdrun.errors import KdrunError


def _check(fields: Mapping[str, Tensor], split: str) -> int:
    if not fields:
        raise ValueError(f"{split}: no fields")
    if "index" in fields:
        raise ValueError(f"{split}: 'index' is reserved (the loader adds each sample's index)")
    sizes = {k: int(v.shape[0]) for k, v in fields.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{split}: every field needs the same number of samples along dim 0, got {sizes}")
    return next(iter(sizes.values()))


@dataclass
class TensorSplits:
    """Training and test fields: ``{name: Tensor (N, ...)}`` each, with the same names."""

    train: dict[str, Tensor]
    test: dict[str, Tensor]
    trim_field: str | None = None  # right-padded (N, L) fields: each batch is cut to the longest non-zero run of this field
    tokenizer: Any = None  # text data: the tokenizer that made the token ids (generation decodes with it)
    cache: Any = None  # a kdrun.data.teacher_cache.TeacherCache of the training split (data.teacher_cache)
    group: int = 1  # rows that stay together (a preference pair's chosen and rejected rows: 2), in order
    teacher_tokenizer: Any = None  # a teacher that tokenises the text itself (its own ``teacher_*`` fields)
    alignment: str = "identical"  # how those fields are aligned with the student's (kdrun.data.alignment)

    def __post_init__(self) -> None:
        _check(self.train, "train")
        _check(self.test, "test")
        if set(self.train) != set(self.test):
            raise ValueError(f"train fields {sorted(self.train)} and test fields {sorted(self.test)} differ")
        if self.trim_field is not None and self.trim_field not in self.train:
            raise ValueError(f"trim_field '{self.trim_field}' is not a field ({sorted(self.train)})")
        if self.group > 1 and (self.num_train % self.group or _check(self.test, "test") % self.group):
            raise ValueError(f"grouped rows: each split needs a multiple of {self.group} rows")

    @property
    def num_train(self) -> int:
        return int(next(iter(self.train.values())).shape[0])

    @property
    def train_labels(self) -> Tensor | None:
        """The ``target`` field when it holds one class label per sample, else None."""
        y = self.train.get("target")
        return y.long() if y is not None and y.dim() == 1 and not y.is_floating_point() else None

    def sample_batch(self, k: int = 2) -> dict[str, Tensor]:
        """The first ``k`` training samples as a batch, for the builder's shape trace."""
        out = {name: v[:k] for name, v in self.train.items()}
        out["index"] = torch.arange(min(k, self.num_train))
        if self.cache is not None:
            width = next(v for v in out.values() if v.dim() >= 2).shape[1]
            out.update(self.cache.read(out["index"], int(width), "cpu"))
        return out

    def select(self, kept: Tensor) -> TensorSplits:
        """The training rows ``kept`` (indices, in the split's order), the test split as it is."""
        self._ungrouped("data.selection")
        kept = kept.long().sort().values
        return self._with({k: v[kept] for k, v in self.train.items()}, self.test)

    def _with(self, train: dict[str, Tensor], test: dict[str, Tensor]) -> TensorSplits:
        """Other rows of the same data: the tokenizers and the alignment kept (the row-indexed cache is not)."""
        return TensorSplits(train, test, self.trim_field, self.tokenizer, teacher_tokenizer=self.teacher_tokenizer,
                            alignment=self.alignment)

    def _ungrouped(self, key: str) -> None:
        if self.group > 1:
            raise KdrunError(f"{key}: these data keep rows in groups of {self.group} (preference pairs); a choice of rows "
                             f"would split them. Set {key}=null and cut the file itself (data.source.max_examples)")

    def subset(self, n: int, seed: int = 0) -> TensorSplits:
        """``n`` training samples and a proportional number of test samples, each a seeded choice,
        class-stratified when the ``target`` field holds class labels, kept in order."""
        self._ungrouped("data.subset")
        n_train, n_test = self.num_train, _check(self.test, "test")
        n = min(int(n), n_train)
        m = max(1, math.ceil(n_test * n / n_train))
        train = stratified_indices(self.train.get("target"), n, n_train, seed)
        test = stratified_indices(self.test.get("target"), m, n_test, seed + 1)
        return self._with({k: v[train] for k, v in self.train.items()}, {k: v[test] for k, v in self.test.items()})

    @property
    def class_coverage(self) -> dict[str, int | None]:
        """Distinct classes of the ``target`` field in each split (None for data without class labels)."""
        return {"train": class_coverage(self.train.get("target")), "test": class_coverage(self.test.get("target"))}

    def validation_split(self, n: int, seed: int = 0) -> TensorSplits:
        """Hold out ``n`` training samples (a seeded choice) as the evaluation set."""
        self._ungrouped("data.val_split")
        total = self.num_train
        if not 0 < n < total:
            raise ValueError(f"data.val_split must be between 1 and {total - 1}, got {n}")
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        val, train = perm[:n].sort().values, perm[n:].sort().values
        return self._with({k: v[train] for k, v in self.train.items()}, {k: v[val] for k, v in self.train.items()})


class TensorLoader:
    """Batches of ``{field: ..., "index"}`` from in-memory tensors (moved to ``device`` once).

    ``batch_size`` is the global batch; under data parallelism each rank serves its contiguous share
    of every global batch (as :class:`~kdrun.data.arrays.ArrayLoader` does)."""

    def __init__(self, fields: Mapping[str, Tensor], *, batch_size: int, train: bool, device: torch.device,
                 seed: int = 0, drop_last: bool = False, max_batches: int | None = None, rank: int = 0,
                 world_size: int = 1, trim_field: str | None = None, cache: Any = None, group: int = 1) -> None:
        self.device = torch.device(device)
        self.cache = cache  # a TeacherCache: its fields are read per batch by host sample indices
        self.fields = {k: v.to(self.device) for k, v in fields.items()}
        self.n = _check(self.fields, "data")
        # dynamic padding: per-sample lengths on the host, so cutting a batch reads no device tensor
        self.lengths = None if trim_field is None else (fields[trim_field] != 0).sum(dim=1).cpu()
        self.width = None if trim_field is None else int(fields[trim_field].shape[1])
        # a model with its own tokenisation of the text (a teacher with another tokenizer, kdrun.data.alignment):
        # the fields ``<prefix>_*`` beside a ``<prefix>_<trim_field>`` are cut by that field's lengths
        suffix = None if trim_field is None else f"_{trim_field}"
        self.own_lengths = {k[:-len(trim_field)]: (v != 0).sum(dim=1).cpu() for k, v in fields.items()
                            if suffix is not None and k.endswith(suffix)}
        self.batch_size, self.train = int(batch_size), train
        self.drop_last = drop_last and train
        self.seed, self.max_batches = int(seed), max_batches
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch_key, self.start = 0, 0
        # a domain-weighted sampler (DDK): a callable giving the mixture over the ``domain`` field's values; each
        # training batch is then drawn with replacement, a sample of domain d with probability w_d / n_d, seeded by
        # (seed, epoch, batch) on the host, so every rank draws the same global batch and a resume the same batches
        self.domain_weights: Any = None
        self.domains = fields["domain"].long().cpu() if "domain" in fields else None
        self.domain_counts = torch.bincount(self.domains).double() if self.domains is not None else None  # once
        self.group = int(group)  # rows shuffled, batched and shared among ranks together (preference pairs: 2)
        if self.batch_size % self.group:
            raise KdrunError(f"a batch size of {self.batch_size} (data.batch_size / data.eval_batch_size) counts rows, and "
                             f"these data keep them in groups of "
                             f"{self.group} (preference pairs: a chosen and a rejected row): use a multiple of {self.group}")

    def __len__(self) -> int:
        batches = self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)
        if self._merges_last(batches):
            batches -= 1
        return min(batches, self.max_batches) if self.max_batches else batches

    def _merges_last(self, batches: int) -> bool:
        """Under data parallelism, a last partial batch with fewer rows (groups) than ranks would leave some rank
        nothing to evaluate (a Hugging Face model cannot read 0 rows; a sharded one would wait for that rank), so it
        joins the batch before it."""
        if self.drop_last or self.world_size == 1 or batches < 2:
            return False
        return (self.n - (batches - 1) * self.batch_size) // self.group < self.world_size

    def _bounds(self, i: int) -> tuple[int, int]:
        """The rows ``[start, stop)`` of global batch ``i`` (in the epoch's order)."""
        start = i * self.batch_size
        last = len(self) - 1 if self.max_batches is None or len(self) < self.max_batches else None
        if i == last and self._merges_last(math.ceil(self.n / self.batch_size)):
            return start, self.n
        return start, min(start + self.batch_size, self.n)

    def set_epoch(self, key: int, start: int = 0) -> None:
        """Select the epoch whose order the next iteration serves, from its batch ``start`` on."""
        self.epoch_key, self.start = int(key), int(start)

    def _sample_probabilities(self) -> Tensor | None:
        """(N,) per-sample probabilities from the domain mixture, or None without a domain-weighted sampler."""
        if self.domain_weights is None:
            return None
        if self.domains is None:
            raise KdrunError("a domain-weighted sampler (DDK) needs a 'domain' field: data.source.domains")
        w = self.domain_weights().double()
        if int(self.domains.max()) >= w.numel():
            raise KdrunError(f"the data has {int(self.domains.max()) + 1} domains but the sampler weighs {w.numel()}: set "
                             f"the term's num_domains to the number of data.source.domains")
        return w[self.domains] / self.domain_counts[self.domains].clamp_min(1)

    def _cut(self, name: str, v: Tensor, width: int, own: Mapping[str, int]) -> Tensor:
        """A field cut to its batch's longest example: its own tokenisation's length for ``<prefix>_*`` fields."""
        if v.dim() < 2:
            return v
        for prefix, w in own.items():
            if name.startswith(prefix):
                return v[:, :w]
        return v[:, :width] if v.shape[1] == self.width else v

    def rank_sizes(self, i: int) -> list[int]:
        start, stop = self._bounds(i)
        return [self.group * k for k in shard_sizes((stop - start) // self.group, self.world_size)]

    def _share(self, idx: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch's rows, whole groups each."""
        if self.world_size == 1:
            return idx
        return torch.tensor_split(idx.view(-1, self.group), self.world_size)[self.rank].reshape(-1)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch_key)
        units = self.n // self.group
        order = (torch.randperm(units, generator=gen, device=self.device) if self.train
                 else torch.arange(units, device=self.device))
        if self.group > 1:
            order = (order.view(-1, 1) * self.group + torch.arange(self.group, device=self.device)).view(-1)
        host_order = order.cpu() if self.lengths is not None or self.cache is not None else None  # once per epoch
        start, self.start = self.start, 0
        weighted = self.train and self.domain_weights is not None
        if weighted and self.group > 1:
            raise KdrunError("a domain-weighted sampler (DDK) draws single samples; these data keep rows in groups")
        if self.n // self.group < self.world_size:
            raise KdrunError(f"{'training' if self.train else 'test'} data of {self.n} rows cannot give each of "
                             f"{self.world_size} ranks one{' group' if self.group > 1 else ''}: use fewer ranks, or more data")
        for i in range(start, len(self)):
            span = slice(*self._bounds(i))
            idx = order[span]
            host = host_order[span] if host_order is not None else None
            if weighted:  # this batch's domain-weighted draw, from the weights as they are now
                draw = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch_key) * 1_000_003 + i)
                host = torch.multinomial(self._sample_probabilities(), idx.numel(), replacement=True, generator=draw)
                idx = host.to(self.device)
            idx = self._share(idx)
            batch = {k: v[idx] for k, v in self.fields.items()}
            if self.lengths is not None:  # every rank cuts at the global batch's longest sample
                width = int(self.lengths[host].max())
                own = {p: int(n[host].max()) for p, n in self.own_lengths.items()}
                batch = {k: self._cut(k, v, width, own) for k, v in batch.items()}
            batch["index"] = idx
            if self.cache is not None:
                hidx = self._share(host)
                width = next(v for v in batch.values() if v.dim() >= 2).shape[1]
                batch.update(self.cache.read(hidx, int(width), self.device))
            yield batch


__all__ = ["TensorLoader", "TensorSplits"]
