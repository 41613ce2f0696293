"""Streaming statistics with memory independent of the data size, mergeable across processes.

Three accumulators, each kept under ``torch.no_grad()`` on detached tensors, in float64 where
they hold sums:

* :class:`RunningMoments`: per-unit count, mean and variance (Welford / Chan), excluding
  non-finite values;
* :class:`NonFiniteCount`: how many NaN and Inf values went by;
* :class:`Reservoir`: a uniform random sample (Algorithm R) of per-sample feature vectors,
  with optional labels or target vectors.

Each is created empty, raises :class:`~neuroexapt.errors.NeuroExaptError` when a statistic is
read before any update (gromo ``TensorStatistic``), and has an in-place collective
(``all_reduce_`` / ``all_gather_``) that is a no-op unless ``torch.distributed`` is initialised.

Example:
    >>> m = RunningMoments(3)
    >>> m.update(torch.randn(100, 3))
    >>> m.update(torch.randn(50, 3))
    >>> m.count
    tensor([150., 150., 150.], dtype=torch.float64)
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from neuroexapt.errors import ConfigError, NeuroExaptError

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteCount", "Reservoir", "RunningMoments"]

_EMPTY = "no samples yet: run a forward pass inside the collector first"


def _distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device collectives of ``group`` need: CUDA for NCCL, otherwise the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``t`` over ``group``, returned on ``t``'s device."""
    buf = t.to(_comm_device(group)).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


class RunningMoments:
    """Per-unit count, mean and sum of squared deviations (M2) of a stream of [n, D] batches.

    Batches are folded in with Chan's parallel update, so the result equals a single pass over
    the concatenated data up to float64 rounding. Non-finite values are skipped per unit, so
    counts may differ between units. A unit with no value has a NaN mean; one with fewer than
    two values has a NaN variance.

    Across processes, :meth:`all_reduce_` gives every rank the statistics of the union in two
    sum-reductions: first of (count, count x mean), which fixes the global mean, then of
    ``M2_k + count_k (mean_k - mean)^2`` (the exact pooled M2). Alternatively gather
    :meth:`state` tensors and fold them with :meth:`from_state` and :meth:`merge`.

    Example:
        >>> a, b = RunningMoments(4), RunningMoments(4)
        >>> a.update(x[:10]); b.update(x[10:]); a.merge(b)
        >>> torch.allclose(a.var, x.double().var(0))
        True
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"RunningMoments needs dim >= 1 units, got {dim!r}")
        self.dim = dim
        zeros = torch.zeros(dim, dtype=torch.float64, device=device)
        self._count, self._mean, self._m2 = zeros, zeros.clone(), zeros.clone()

    # ---------------------------------------------------------------- updates
    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        """Fold in a batch of shape [n, dim]; NaN and Inf entries are skipped."""
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ConfigError(
                f"RunningMoments({self.dim}) takes batches of shape [n, {self.dim}], "
                f"got {tuple(batch.shape)}"
            )
        if self._count.device != batch.device and not self._count.any():
            self._to(batch.device)  # follow the data while empty: no host sync per batch
        # the batch's own moments in its precision (at least float32; 8x faster than float64
        # on the CPU), folded into the float64 totals
        work = torch.promote_types(batch.dtype, torch.float32)
        x = batch.detach().to(self._count.device, work)
        total = x.sum(0)
        if bool(torch.isfinite(total).all()):  # no NaN/Inf: the plain formulas, no masks
            n_b = torch.full_like(total, float(x.shape[0]), dtype=torch.float64)
            mean_b = total / max(1, x.shape[0])
            m2_b = (x - mean_b).square().sum(0)
        else:
            finite = torch.isfinite(x)
            n_b = finite.sum(0, dtype=torch.float64)
            mean_b = torch.where(finite, x, 0.0).sum(0) / n_b.clamp(min=1.0).to(work)
            m2_b = torch.where(finite, x - mean_b, 0.0).square().sum(0)
        self._combine(n_b, mean_b.double(), m2_b.double())

    @torch.no_grad()
    def update_fraction(self, hits: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Fold in a boolean batch [n, dim] as 0/1 values; ``valid`` False entries are skipped.

        The same result as :meth:`update` on ``hits.double()`` (with NaN where not valid), from
        two counts per unit: for 0/1 values with ``k`` ones in ``n``, the mean is ``k / n`` and
        the sum of squared deviations ``k (1 - k / n)``.
        """
        if hits.ndim != 2 or hits.shape[1] != self.dim or hits.dtype != torch.bool:
            raise ConfigError(f"update_fraction takes a bool batch [n, {self.dim}], got "
                              f"{hits.dtype} {tuple(hits.shape)}")
        if self._count.device != hits.device and not self._count.any():
            self._to(hits.device)
        hits = hits.to(self._count.device)
        if valid is None:
            n_b = torch.full((self.dim,), float(hits.shape[0]), dtype=torch.float64,
                             device=hits.device)
        else:
            valid = valid.to(hits.device)
            hits = hits & valid
            n_b = valid.sum(0, dtype=torch.float64)
        k = hits.sum(0, dtype=torch.float64)
        mean_b = k / n_b.clamp(min=1.0)
        self._combine(n_b, mean_b, k * (1.0 - mean_b))

    @torch.no_grad()
    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold ``other``'s statistics into these, in place; returns ``self``."""
        if not isinstance(other, RunningMoments) or other.dim != self.dim:
            raise ConfigError(f"can only merge RunningMoments({self.dim}), got {other!r}")
        dev = self._count.device
        self._combine(other._count.to(dev), other._mean.to(dev), other._m2.to(dev))
        return self

    def _combine(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al.'s pairwise update of (count, mean, M2)."""
        n = self._count + n_b
        safe_n = n.clamp(min=1.0)
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / safe_n)
        self._m2 = self._m2 + m2_b + delta.square() * (self._count * n_b / safe_n)
        self._count = n

    @torch.no_grad()
    def all_reduce_(self, group: dist.ProcessGroup | None = None) -> RunningMoments:
        """Replace these statistics by those of all ranks together; no-op without distributed."""
        if not _distributed():
            return self
        sums = _all_reduce(torch.cat([self._count, self._count * self._mean]), group)
        n, total = sums[: self.dim], sums[self.dim :]
        mean = total / n.clamp(min=1.0)
        m2 = _all_reduce(self._m2 + self._count * (self._mean - mean).square(), group)
        self._count, self._mean, self._m2 = n, mean, m2
        return self

    # ---------------------------------------------------------------- reading
    def _check(self) -> None:
        if not bool(self._count.any()):
            raise NeuroExaptError(f"RunningMoments({self.dim}) has {_EMPTY}")

    @property
    def count(self) -> torch.Tensor:
        """Number of finite values seen per unit, float64 [dim]."""
        return self._count.clone()

    @property
    def mean(self) -> torch.Tensor:
        """Per-unit mean, float64 [dim]; NaN for units without values."""
        self._check()
        return torch.where(self._count > 0, self._mean, torch.nan)

    @property
    def var(self) -> torch.Tensor:
        """Per-unit unbiased variance, float64 [dim]; NaN for units with fewer than 2 values."""
        self._check()
        return torch.where(self._count > 1, self._m2 / (self._count - 1).clamp(min=1.0), torch.nan)

    # ---------------------------------------------------------------- state
    def state(self) -> torch.Tensor:
        """A flat float64 tensor ``[count, mean, M2]`` of length ``3 * dim``."""
        return torch.cat([self._count, self._mean, self._m2])

    @classmethod
    def from_state(cls, state: torch.Tensor) -> RunningMoments:
        """Rebuild the accumulator that :meth:`state` described."""
        if state.ndim != 1 or state.numel() == 0 or state.numel() % 3:
            raise ConfigError(
                "a RunningMoments state is a flat tensor of length 3 * dim, got "
                f"{tuple(state.shape)}"
            )
        out = cls(state.numel() // 3, device=state.device)
        out._count, out._mean, out._m2 = state.detach().double().clone().view(3, -1).unbind(0)
        return out

    def _to(self, device: torch.device) -> None:
        self._count, self._mean, self._m2 = (t.to(device) for t in self.state().view(3, -1))

    def memory_bytes(self) -> int:
        """Bytes held by the accumulator's tensors."""
        return sum(t.numel() * t.element_size() for t in (self._count, self._mean, self._m2))

    def __repr__(self) -> str:
        return f"RunningMoments(dim={self.dim}, max_count={int(self._count.max())})"


class NonFiniteCount:
    """Counts of NaN and Inf values, kept on the data's device.

    An update checks the finiteness of one sum (one host synchronisation on a GPU) and counts
    NaN and Inf element by element only when that check fails.
    """

    def __init__(self) -> None:
        self._counts = torch.zeros(2, dtype=torch.int64)  # [nan, inf]

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> bool:
        """Count the NaN and Inf entries of ``values`` (any shape); True when there are none."""
        if self._counts.device != values.device:
            self._counts = self._counts.to(values.device)
        v = values.detach()
        if bool(torch.isfinite(v.sum())):  # one pass: a finite sum means no NaN and no Inf
            return True
        counts = torch.stack([torch.isnan(v).sum(), torch.isinf(v).sum()])
        self._counts += counts
        return not bool(counts.any())

    @property
    def nan(self) -> int:
        """NaN values seen."""
        return int(self._counts[0])

    @property
    def inf(self) -> int:
        """Inf values (of either sign) seen."""
        return int(self._counts[1])

    def merge(self, other: NonFiniteCount) -> NonFiniteCount:
        """Add ``other``'s counts to these, in place; returns ``self``."""
        self._counts = self._counts + other._counts.to(self._counts.device)
        return self

    def all_reduce_(self, group: dist.ProcessGroup | None = None) -> NonFiniteCount:
        """Sum the counts over all ranks; no-op without distributed."""
        if _distributed():
            self._counts = _all_reduce(self._counts, group)
        return self

    def memory_bytes(self) -> int:
        """Bytes held."""
        return self._counts.numel() * self._counts.element_size()


class Reservoir:
    """A uniform random sample of at most ``capacity`` feature vectors, with optional labels.

    Algorithm R (Vitter, 1985): the first ``capacity`` items fill the buffer, then item number
    ``t`` (0-based) replaces a uniformly chosen slot with probability ``capacity / (t + 1)``.
    After any number of items every one of them is in the buffer with the same probability.
    Memory is fixed at ``capacity x dim`` features (``dtype``) plus ``capacity`` labels (int64)
    or ``capacity x K`` target vectors (float32), allocated at the first :meth:`add`.

    Samples whose features are not all finite are skipped (they do not count as seen). The
    result is deterministic given ``seed`` and the sequence of batches. Labels are all-or-none:
    the first :meth:`add` decides whether this reservoir carries them.

    Merging (:meth:`merge`, :meth:`all_gather_`) concatenates then subsamples: the number of
    survivors from each part is drawn from the multivariate hypergeometric law of the parts'
    ``seen`` counts, and survivors are drawn uniformly from each part's sample, which gives a
    uniform sample of the union. The draw is seeded by ``(seed, total seen)``, so every rank
    computes the same merged reservoir.

    Example:
        >>> r = Reservoir(capacity=100, dim=8, seed=0)
        >>> r.add(torch.randn(1000, 8), torch.randint(0, 10, (1000,)))
        >>> x, y = r.samples()
        >>> x.shape, y.shape
        (torch.Size([100, 8]), torch.Size([100]))
    """

    def __init__(
        self, capacity: int, dim: int, seed: int = 0, *, dtype: torch.dtype = torch.float32
    ) -> None:
        for name, value, low in (("capacity", capacity, 1), ("dim", dim, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"Reservoir needs an integer {name} >= {low}, got {value!r}")
        self.capacity, self.dim, self.seed, self.dtype = capacity, dim, seed, dtype
        self.seen = 0  # finite items offered so far
        self.labelled: bool | None = None  # fixed by the first add
        self._x: torch.Tensor | None = None  # [capacity, dim]
        self._y: torch.Tensor | None = None  # [capacity] int64 or [capacity, K] float32
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def size(self) -> int:
        """Number of samples held: ``min(seen, capacity)``."""
        return min(self.seen, self.capacity)

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Offer ``features`` [n, dim] with ``labels`` [n] (classes) or [n, K] (targets).

        One host synchronisation per call (to drop non-finite rows).
        """
        self._check_batch(features, labels)
        keep = torch.isfinite(features).all(1)
        if labels is not None and labels.is_floating_point():
            keep &= torch.isfinite(labels.reshape(len(labels), -1)).all(1)
        x = features.detach()[keep]
        y = None if labels is None else labels.detach().to(x.device)[keep]
        self._allocate(x.device, y)
        slot, src = self._slots(len(x))
        if len(slot):
            self._x[slot.to(x.device)] = x[src.to(x.device)].to(self.dtype)
            if y is not None:
                self._y[slot.to(x.device)] = y[src.to(x.device)].to(self._y.dtype)
        self.seen += len(x)

    def _check_batch(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ConfigError(
                f"Reservoir(dim={self.dim}) takes features of shape [n, {self.dim}], "
                f"got {tuple(features.shape)}"
            )
        if labels is not None and (labels.ndim not in (1, 2) or len(labels) != len(features)):
            raise ConfigError(
                f"labels must have shape [n] or [n, K] with n={len(features)} like the "
                f"features, got {tuple(labels.shape)}"
            )
        labelled = labels is not None
        if self.labelled is None:
            self.labelled = labelled
        elif labelled != self.labelled:
            had = "with" if self.labelled else "without"
            raise ConfigError(
                f"this reservoir was filled {had} labels and now got a batch "
                f"{'with' if labelled else 'without'}; give labels for every batch or for none"
            )

    def _allocate(self, device: torch.device, y: torch.Tensor | None) -> None:
        if self._x is None:
            self._x = torch.zeros(self.capacity, self.dim, dtype=self.dtype, device=device)
        if y is not None and self._y is None:
            dtype = torch.float32 if y.is_floating_point() else torch.int64
            self._y = torch.zeros(self.capacity, *y.shape[1:], dtype=dtype, device=device)

    def _slots(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm R for the next ``n`` items: (slots written, index of the item written)."""
        t = torch.arange(self.seen, self.seen + n, dtype=torch.int64)
        u = torch.rand(n, generator=self._gen, dtype=torch.float64)
        slot = torch.where(t < self.capacity, t, (u * (t + 1).double()).long())
        accept = slot < self.capacity
        # several items may pick one slot: the last wins, as in the sequential algorithm
        winner = torch.full((self.capacity,), -1, dtype=torch.int64)
        winner.scatter_reduce_(0, slot[accept], torch.arange(n)[accept], reduce="amax")
        filled = (winner >= 0).nonzero().squeeze(1)
        return filled, winner[filled]

    def samples(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The held samples: features [m, dim] and labels [m] / [m, K] (or None), m = size."""
        if self.seen == 0 or self._x is None:
            raise NeuroExaptError(f"Reservoir(capacity={self.capacity}) has {_EMPTY}")
        m = self.size
        y = None if self._y is None else self._y[:m].clone()
        return self._x[:m].clone(), y

    # ---------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self, other: Reservoir) -> Reservoir:
        """Replace this sample by a uniform sample of both streams, in place; returns ``self``."""
        if not isinstance(other, Reservoir) or (other.capacity, other.dim) != (
            self.capacity, self.dim
        ):
            raise ConfigError(
                f"can only merge a Reservoir(capacity={self.capacity}, dim={self.dim}), "
                f"got {other!r}"
            )
        parts = [r for r in (self, other) if r.seen > 0]
        kinds = {(r.labelled, None if r._y is None else (r._y.dtype, r._y.shape[1:]))
                 for r in parts}
        if len(kinds) > 1:
            raise ConfigError(
                f"cannot merge reservoirs with different labels (labelled, dtype, shape): {kinds}"
            )
        if other.seen > 0:  # else nothing changes
            self._set_union(parts)
        return self

    def _set_union(self, parts: list[Reservoir]) -> None:
        total = sum(r.seen for r in parts)
        k = min(self.capacity, total)
        rng = np.random.default_rng([self.seed, total])
        take = rng.multivariate_hypergeometric([r.seen for r in parts], k)
        xs, ys = [], []
        for r, n in zip(parts, take.tolist(), strict=True):
            pick = torch.from_numpy(rng.permutation(r.size)[:n]).to(r._x.device)
            xs.append(r._x[pick])
            ys.append(None if r._y is None else r._y[pick])
        device = parts[0]._x.device
        x = torch.zeros(self.capacity, self.dim, dtype=self.dtype, device=device)
        x[:k] = torch.cat([t.to(device) for t in xs])
        y = None
        if ys[0] is not None:
            y = torch.zeros(self.capacity, *ys[0].shape[1:], dtype=ys[0].dtype, device=device)
            y[:k] = torch.cat([t.to(device) for t in ys])
        self._x, self._y, self.seen, self.labelled = x, y, total, parts[0].labelled

    @torch.no_grad()
    def all_gather_(self, group: dist.ProcessGroup | None = None) -> Reservoir:
        """Replace this sample by a uniform sample of all ranks' streams; no-op if not distributed.

        Every rank ends with the same reservoir. Call it once: a second call counts again.
        """
        if not _distributed():
            return self
        dev = _comm_device(group)
        metas = _gather(self._meta().to(dev), group)
        labelled = {int(m[1]) for m in metas if int(m[0]) > 0}
        kinds = {tuple(m[1:].tolist()) for m in metas if int(m[0]) > 0}
        if len(kinds) > 1:
            raise ConfigError(f"ranks hold reservoirs of different label kinds: {sorted(kinds)}")
        if not kinds:
            return self
        meta = metas[[int(m[0]) > 0 for m in metas].index(True)]
        self._allocate_like(meta, dev)
        xs = _gather(self._x.to(dev), group)
        ys = _gather(self._y.to(dev), group) if 1 in labelled else [None] * len(xs)
        acc = None
        for m, x, y in zip(metas, xs, ys, strict=True):
            part = Reservoir(self.capacity, self.dim, self.seed, dtype=self.dtype)
            part.seen, part.labelled, part._x, part._y = int(m[0]), bool(m[1]), x, y
            acc = part if acc is None else acc.merge(part)
        device = self._x.device
        self._x, self.seen, self.labelled = acc._x.to(device), acc.seen, acc.labelled
        self._y = None if acc._y is None else acc._y.to(device)
        return self

    def _meta(self) -> torch.Tensor:
        """[seen, labelled, labels are float, K (0 for class labels)]."""
        y = self._y
        is_float = int(y is not None and y.is_floating_point())
        width = 0 if y is None or y.ndim == 1 else y.shape[1]
        return torch.tensor([self.seen, int(bool(self.labelled)), is_float, width])

    def _allocate_like(self, meta: torch.Tensor, device: torch.device) -> None:
        """Allocate empty buffers matching another rank's ``meta`` (for ranks without data)."""
        if self._x is None:
            self._x = torch.zeros(self.capacity, self.dim, dtype=self.dtype, device=device)
        if bool(meta[1]) and self._y is None:
            dtype = torch.float32 if bool(meta[2]) else torch.int64
            shape = (self.capacity, int(meta[3])) if int(meta[3]) else (self.capacity,)
            self._y = torch.zeros(shape, dtype=dtype, device=device)

    def memory_bytes(self) -> int:
        """Bytes held by the sample buffers."""
        return sum(t.numel() * t.element_size() for t in (self._x, self._y) if t is not None)

    def __repr__(self) -> str:
        return (
            f"Reservoir(capacity={self.capacity}, dim={self.dim}, seen={self.seen}, "
            f"labelled={self.labelled})"
        )


def _gather(t: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """``all_gather`` of equally shaped tensors."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out
