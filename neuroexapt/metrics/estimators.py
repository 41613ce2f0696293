"""Information estimators for activations: entropy, mutual information, HSIC, effective rank.

Pure functions from tensors to numbers, in nats, computed in float64 on the input's device.
``x`` is an ``[N, D]`` tensor of N samples of D units; ``y`` is either ``[N]`` integer class
labels or an ``[N, D']`` (or ``[N]``) float tensor. Every estimator is bounded where the quantity
is: mutual information with K classes never exceeds ``log K``, the ceiling that an unbounded
estimator (17.6 nats on pure noise for K = 10) broke.

Bandwidths of Gaussian kernels (argument ``sigma``) are a positive float or a rule:

* ``"silverman"``: ``sigma = sqrt(trace(cov(x))) * N ** (-1 / (4 + D))``. Silverman's rate with
  the scale taken from the total standard deviation (the root-mean-square distance to the mean)
  rather than a per-unit one, so that distances in high dimension, which grow like ``sqrt(D)``,
  do not make every sample its own cluster (with the per-unit scale, noise with D = 256,
  N = 512 and 10 labels measures 2.29 nats, the maximum; with the total scale, 1.35).
  Resolves clustered features well (labels copied into features: 0.99 of H(Y)) at the price
  of a large upward bias on independent data (0.91 nats at N = 500, D = 4, K = 10).
* ``"median"``: the median of the positive pairwise Euclidean distances (Gretton's heuristic).
  Larger in low dimension: less finite-sample bias (0.10 nats in the case above), but coarser
  clusters (labels copied into features: 0.60 of H(Y) at K = 10). The default of
  :func:`hsic`.

Measured biases of every method are listed in :func:`mutual_information`.

Example:
    >>> x = torch.randn(500, 4)
    >>> y = torch.randint(0, 10, (500,))
    >>> mutual_information(x, y) <= math.log(10)
    True
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from neuroexapt.errors import ConfigError

__all__ = [
    "MI_METHODS",
    "SIGMA_RULES",
    "UNIT_ENTROPY_METHODS",
    "effective_rank",
    "entropy",
    "hsic",
    "label_entropy",
    "mutual_information",
    "renyi_entropy",
    "unit_entropy",
]

logger = logging.getLogger(__name__)

UNIT_ENTROPY_METHODS = ("binned", "gaussian")
MI_METHODS = ("renyi", "ksg", "gaussian")
SIGMA_RULES = ("silverman", "median")
MAX_BINS = 64  # cap of the default number of bins, ceil(sqrt(N))
GAUSSIAN_RIDGE = 1e-6  # added to the diagonal of the correlation matrix in method="gaussian"
TIE_JITTER = 1e-10  # breaks ties between samples in method="ksg" (standardised units)


# ----------------------------------------------------------------------------- validation


def _as_features(x: Tensor, name: str = "x") -> Tensor:
    """Checks an ``[N, D]`` tensor of N >= 2 finite samples and returns it in float64."""
    if not isinstance(x, Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape [N, D], got {type(x).__name__}")
    if x.ndim != 2:
        raise ConfigError(
            f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}; use {name}.unsqueeze(1) "
            f"for a single unit or {name}.flatten(1) for feature maps"
        )
    if x.is_complex():
        raise ConfigError(f"{name} must be real, got dtype {x.dtype}")
    if x.shape[0] < 2:
        raise ConfigError(f"{name} needs N >= 2 samples, got N = {x.shape[0]}")
    if x.shape[1] < 1:
        raise ConfigError(f"{name} needs at least one unit (D >= 1), got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ConfigError(f"{name} has {bad} non-finite values (NaN or inf); remove or clip them")
    return x


def _as_target(y: Tensor, n: int) -> tuple[Tensor, bool]:
    """Returns ``(labels in 0..K-1, True)`` for integer ``y`` or ``(float64 [N, D'], False)``."""
    if not isinstance(y, Tensor):
        raise ConfigError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.shape[:1] != (n,):
        raise ConfigError(f"x and y must have the same N; x has N = {n}, y has shape "
                          f"{tuple(y.shape)}")
    if y.is_floating_point():
        return _as_features(y.reshape(n, -1) if y.ndim == 1 else y, "y"), False
    if y.is_complex() or y.ndim != 1:
        raise ConfigError(f"y must be [N] integer labels or an [N, D'] float tensor, got "
                          f"shape {tuple(y.shape)} and dtype {y.dtype}")
    return torch.unique(y.detach(), return_inverse=True)[1], True


def _as_labels(y: Tensor) -> Tensor:
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.ndim != 1:
        what = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"y must be a 1-D integer label tensor, got {what}")
    if y.shape[0] < 2:
        raise ConfigError(f"y needs N >= 2 samples, got N = {y.shape[0]}")
    return torch.unique(y.detach(), return_inverse=True)[1]


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0 (1 is the Shannon limit), "
                          f"got {alpha!r}")


def _check_method(method: str, valid: tuple[str, ...]) -> None:
    if method not in valid:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(valid)}")


# ----------------------------------------------------------------------------- kernels


def _sq_dists(x: Tensor) -> Tensor:
    """Squared Euclidean distances, centred first for accuracy; O(N^2 D)."""
    xc = x - x.mean(0)
    norms = (xc * xc).sum(1)
    d2 = (norms[:, None] + norms[None, :] - 2.0 * (xc @ xc.T)).clamp_min_(0.0)
    return d2.fill_diagonal_(0.0)


def _bandwidth(x: Tensor, d2: Tensor, sigma: float | str | None, default: str) -> float:
    """Resolves ``sigma`` (a float or a rule of :data:`SIGMA_RULES`) for data ``x``."""
    rule = default if sigma is None else sigma
    if not isinstance(rule, str):
        if not (isinstance(rule, (int, float)) and math.isfinite(rule) and rule > 0):
            raise ConfigError(f"sigma must be a positive float or one of {SIGMA_RULES}, "
                              f"got {sigma!r}")
        return float(rule)
    if rule == "silverman":
        n, d = x.shape
        return float(x.var(0).sum().sqrt()) * n ** (-1.0 / (4 + d))
    if rule == "median":
        n = x.shape[0]
        iu = torch.triu_indices(n, n, 1, device=x.device)
        dist = d2[iu[0], iu[1]].sqrt()
        dist = dist[dist > 0]
        return float(dist.median()) if dist.numel() else 0.0
    raise ConfigError(f"unknown sigma rule {rule!r}; valid rules: {', '.join(SIGMA_RULES)}, "
                      f"or a positive float")


def _gaussian_gram(x: Tensor, sigma: float | str | None, default: str) -> Tensor:
    """Gaussian Gram matrix ``exp(-|xi - xj|^2 / (2 sigma^2))`` with unit diagonal."""
    d2 = _sq_dists(x)
    s = _bandwidth(x, d2, sigma, default)
    if s == 0.0:  # all samples identical: every kernel agrees on an all-ones Gram
        return torch.ones_like(d2)
    return torch.exp(d2 / (-2.0 * s * s))


def _delta_gram(labels: Tensor) -> Tensor:
    """Delta kernel ``[yi == yj]``: the Gram matrix of one-hot labels."""
    return (labels[:, None] == labels[None, :]).to(torch.float64)


def _spectrum_entropy(eigs: Tensor, alpha: float) -> float:
    """Rényi alpha-entropy of a spectrum renormalised to sum 1, clamped to [0, log n].

    Eigenvalues below ``n * eps * max`` are round-off and count as 0 (for ``alpha < 1`` a
    round-off eigenvalue of 1e-17 would otherwise add 1e-8).
    """
    p = eigs / eigs.max()
    p = torch.where(p > p.numel() * torch.finfo(p.dtype).eps, p, torch.zeros_like(p))
    p = p / p.sum()
    if alpha == 1:
        p = p[p > 0]
        h = float(-(p * p.log()).sum())
    else:
        h = math.log(float(p.pow(alpha).sum())) / (1.0 - alpha)
    return min(max(h, 0.0), math.log(p.numel()))


def _proportions(labels: Tensor) -> Tensor:
    return torch.bincount(labels).to(torch.float64) / labels.numel()


def _standardize(x: Tensor) -> Tensor:
    """Zero mean, unit standard deviation per column; constant columns become 0."""
    xc = x - x.mean(0)
    std = xc.std(0)
    return xc / torch.where(std > 0, std, torch.ones_like(std))


def _untie(x: Tensor) -> Tensor:
    """Standardised ``x`` plus a seeded jitter of 1e-10, so that no two samples coincide.

    Nearest-neighbour estimators assume distinct samples: with ties (ReLU zeros, discrete
    features, duplicated rows) a neighbour radius of 0 counts every duplicate, and labels
    copied exactly into features measured 0 nats instead of H(Y). scikit-learn breaks ties
    the same way. Constant units get no jitter.
    """
    gen = torch.Generator(device=x.device).manual_seed(0)
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    varies = (x != x[:1]).any(0)  # a constant unit stays constant: it carries nothing
    return _standardize(x) + TIE_JITTER * noise * varies


# ----------------------------------------------------------------------------- entropy


def unit_entropy(x: Tensor, method: str = "binned", bins: int | None = None) -> Tensor:
    """Entropy of each unit's activations, in nats.

    ``"binned"``: discrete entropy of the bin index, with ``bins`` equal-width bins over each
    unit's own range (default ``min(ceil(sqrt(N)), 64)``), the plug-in estimate plus the
    Miller-Madow correction ``(m - 1) / (2N)`` (m = non-empty bins), clamped to
    ``[0, log(bins)]``. The plug-in estimate is biased low by about ``(m - 1) / (2N)``; the
    correction removes that first-order term. A constant unit has entropy 0. Cost O(N D).

    ``"gaussian"``: differential entropy ``0.5 * log(2 pi e var)`` of a Gaussian with the unit's
    unbiased variance. Exact for Gaussian units, an upper bound on the differential entropy of
    any unit with that variance; it is negative when ``var < 1 / (2 pi e)`` and ``-inf`` for a
    constant unit. Cost O(N D).

    Args:
        x: ``[N, D]`` activations.
        method: One of :data:`UNIT_ENTROPY_METHODS`.
        bins: Number of bins for ``"binned"`` (>= 1); ignored by ``"gaussian"``.

    Returns:
        ``[D]`` float64 tensor of entropies.

    Raises:
        ConfigError: Bad shape, N < 2, non-finite values, unknown method or bad ``bins``.
    """
    _check_method(method, UNIT_ENTROPY_METHODS)
    x = _as_features(x)
    if method == "gaussian":
        return 0.5 * torch.log(2 * math.pi * math.e * x.var(0))
    n, d = x.shape
    b = min(math.ceil(math.sqrt(n)), MAX_BINS) if bins is None else bins
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ConfigError(f"bins must be an integer >= 1, got {bins!r}")
    lo, hi = x.amin(0), x.amax(0)
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    idx = ((x - lo) / width * b).floor().clamp_(0, b - 1).long()
    idx = idx + torch.arange(d, device=x.device) * b
    counts = torch.bincount(idx.flatten(), minlength=d * b).view(d, b).to(torch.float64)
    p = counts / n
    plug_in = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(1)
    miller_madow = ((counts > 0).sum(1) - 1).to(torch.float64) / (2 * n)
    h = (plug_in + miller_madow).clamp(0.0, math.log(b))
    return torch.where(hi > lo, h, torch.zeros_like(h))


def renyi_entropy(x: Tensor, alpha: float = 1.01, sigma: float | str | None = None) -> float:
    """Matrix-based Rényi alpha-entropy (Giraldo, Rao and Principe, 2014), in nats.

    ``S = log(sum_i lambda_i ** alpha) / (1 - alpha)`` over the eigenvalues of
    ``A = K / N``, where ``K`` is the Gaussian Gram matrix (unit diagonal, so ``trace(A) = 1``).
    It is a functional of the sample's kernel geometry, not an estimate of Shannon's
    differential entropy: it lies in ``[0, log N]`` (0 when all samples coincide, ``log N``
    when the kernel separates all of them) and grows with N and as ``sigma`` shrinks.
    ``alpha = 1`` gives the von Neumann (Shannon) limit. Cost O(N^2 D + N^3).

    Args:
        x: ``[N, D]`` samples.
        alpha: Order of the entropy, > 0.
        sigma: Kernel bandwidth or rule (see the module docstring); default ``"silverman"``.

    Returns:
        The entropy, in ``[0, log N]``.

    Raises:
        ConfigError: Bad shape, N < 2, non-finite values, bad ``alpha`` or ``sigma``.
    """
    _check_alpha(alpha)
    x = _as_features(x)
    gram = _gaussian_gram(x, sigma, "silverman")
    return _spectrum_entropy(torch.linalg.eigvalsh(gram / x.shape[0]), alpha)


entropy = renyi_entropy


def label_entropy(y: Tensor) -> float:
    """Shannon entropy of the class proportions of ``y``, in nats; in ``[0, log K]``.

    Equal to the matrix-based entropy of the delta-kernel Gram matrix in the limit
    ``alpha -> 1`` (its eigenvalues are the class proportions). The plug-in estimate, biased
    low by about ``(K - 1) / (2N)``. Cost O(N).

    Raises:
        ConfigError: ``y`` is not a 1-D integer tensor with N >= 2.
    """
    return _spectrum_entropy(_proportions(_as_labels(y)), 1.0)


# ----------------------------------------------------------------------------- mutual information


def mutual_information(
    x: Tensor,
    y: Tensor,
    method: str = "ksg",
    alpha: float = 1.01,
    sigma: float | str | None = None,
    k: int = 3,
) -> float:
    """Mutual information between activations ``x`` and labels or features ``y``, in nats.

    ``"ksg"`` (default): the Kraskov-Stögbauer-Grassberger estimator (algorithm 1, max-norm,
    ``k`` neighbours) for float ``y``; Ross's (2014) nearest-neighbour estimator for labels
    (classes with a single sample are dropped). Columns are standardised first and ties are
    broken by a seeded jitter of 1e-10 (as scikit-learn does; the values agree with its
    ``mutual_info_regression`` / ``mutual_info_classif``). Consistent: near 0 on independent
    data, near H(Y) when the features carry the labels. Measured (nats, seeded):

    * independent ``x ~ N(0, I_D)``, 10 uniform labels, N = 512, max over 5 seeds: 0.023 at
      D = 4, 0.032 at D = 32, 0.067 at D = 256 (at most 0.03 of log 10);
    * labels copied into features (one-hot plus 0.1 noise, or exactly), D = 32 and 256:
      1.000 of H(Y);
    * |error| <= 0.06 at N = 1000 for bivariate Gaussians with rho <= 0.9, within 0.04 of the
      true 1.92 nats of a 10-class Gaussian mixture in 4-D, at most 0.02 on independent float
      ``y`` at N = 500;
    * it is biased low when a weak signal is spread over many dimensions (a 10-class mixture
      whose true MI is 2.29 nats measures 0.74 at D = 256, N = 512): nearest neighbours in
      high dimension are far apart.

    Clamped to ``>= 0`` and, for labels, to ``<= H(Y)``. Cost O(N^2 (D + D')).

    ``"renyi"``: ``I = S(A_x) + S(A_y) - S(A_x o A_y / trace)`` with matrix-based Rényi
    entropies (Giraldo et al. 2014); the joint is the Hadamard product of the Gram matrices,
    labels use the delta kernel, so ``S(A_y)`` is the Rényi entropy of the class proportions
    and the joint splits into one block per class. Clamped to ``[0, min(S(x), S(y))]``, hence
    never above ``log K`` for K classes. It measures dependence at the kernel's scale, not
    Shannon MI, and it is **biased upwards**: every sample of high-dimensional noise is its
    own cluster, so labels look predictable from it. Measured, default ``"silverman"``
    bandwidth / ``sigma="median"``: independent ``x ~ N(0, I_D)`` and 10 labels at N = 512,
    0.90 / 0.10 nats at D = 4, 1.22 / 0.40 at D = 32, 1.35 / 0.74 at D = 256; independent
    ``x ~ N(0, I_4)``, ``y ~ N(0, I_2)``: 1.71 / 0.07; labels copied into features: 0.86 to
    1.00 / 0.58 to 0.79 of H(Y). Cost O(N^2 D + N^3) (O(N^2 D + sum_c N_c^3) for labels).

    ``"gaussian"``: ``0.5 * log(det C_x det C_y / det C_xy)`` from correlation matrices with a
    ridge of 1e-6: consistent for jointly Gaussian data (measured |error| <= 0.06 at N = 1000
    for rho <= 0.9, from sampling error of the correlation), the MI of the Gaussian with the
    same covariance otherwise; needs N well above D + D'. Not defined for labels.
    Cost O(N (D + D')^2 + (D + D')^3).

    Args:
        x: ``[N, D]`` activations.
        y: ``[N]`` integer labels, or ``[N, D']`` / ``[N]`` float features.
        method: One of :data:`MI_METHODS`.
        alpha: Rényi order for ``"renyi"``, > 0.
        sigma: Bandwidth or rule for ``"renyi"`` (the same for x and float y).
        k: Number of neighbours for ``"ksg"``, ``1 <= k < N``.

    Returns:
        The mutual information, >= 0.

    Raises:
        ConfigError: Bad shapes, N mismatch, non-finite values, unknown method, bad ``alpha``,
            ``sigma`` or ``k``, or ``method="gaussian"`` with labels.
    """
    _check_method(method, MI_METHODS)
    x = _as_features(x)
    target, is_labels = _as_target(y, x.shape[0])
    if method == "renyi":
        _check_alpha(alpha)
        return _mi_renyi(x, target, is_labels, alpha, sigma)
    if method == "ksg":
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < x.shape[0]:
            raise ConfigError(f"k must be an integer with 1 <= k < N = {x.shape[0]}, got {k!r}")
        return _mi_ross(x, target, k) if is_labels else _mi_ksg(x, target, k)
    if is_labels:
        raise ConfigError("method='gaussian' needs float y; for integer labels use "
                          "method='renyi' or method='ksg'")
    return _mi_gaussian(x, target)


def _mi_renyi(x: Tensor, y: Tensor, is_labels: bool, alpha: float,
              sigma: float | str | None) -> float:
    n = x.shape[0]
    kx = _gaussian_gram(x, sigma, "silverman")
    s_x = _spectrum_entropy(torch.linalg.eigvalsh(kx / n), alpha)
    if is_labels:  # the joint Gram is block-diagonal: one block of kx per class
        s_y = _spectrum_entropy(_proportions(y), alpha)
        blocks = [kx[m][:, m] for m in (y == c for c in range(int(y.max()) + 1))]
        joint = torch.cat([torch.linalg.eigvalsh(b / n) for b in blocks])
    else:
        ky = _gaussian_gram(y, sigma, "silverman")
        s_y = _spectrum_entropy(torch.linalg.eigvalsh(ky / n), alpha)
        joint = torch.linalg.eigvalsh(kx * ky / n)
    mi = s_x + s_y - _spectrum_entropy(joint, alpha)
    return min(max(mi, 0.0), s_x, s_y)


def _max_norm_dists(x: Tensor) -> Tensor:
    """Chebyshev distances with an infinite diagonal (a point is not its own neighbour)."""
    return torch.cdist(x, x, p=math.inf).fill_diagonal_(math.inf)


def _mi_ksg(x: Tensor, y: Tensor, k: int) -> float:
    n = x.shape[0]
    dx, dy = _max_norm_dists(_untie(x)), _max_norm_dists(_untie(y))
    eps = torch.maximum(dx, dy).kthvalue(k, dim=1).values[:, None]
    nx, ny = ((d < eps).sum(1).to(torch.float64) for d in (dx, dy))
    psi = torch.special.digamma
    mi = float(psi(torch.tensor([float(k), float(n)], dtype=torch.float64)).sum())
    mi -= float((psi(nx + 1.0) + psi(ny + 1.0)).mean())
    return max(mi, 0.0)


def _mi_ross(x: Tensor, labels: Tensor, k: int) -> float:
    counts = torch.bincount(labels)
    keep = counts[labels] > 1  # a class seen once has no same-class neighbour
    if not bool(keep.any()):
        return 0.0
    x, labels = _untie(x[keep]), labels[keep]
    n = x.shape[0]
    dist = _max_norm_dists(x)
    n_c = counts[labels].to(torch.float64)
    k_i = torch.clamp(n_c - 1, max=k)
    radius = torch.empty(n, dtype=torch.float64, device=x.device)
    for c in torch.unique(labels):
        m = labels == c
        radius[m] = dist[m][:, m].kthvalue(int(k_i[m][0]), dim=1).values
    m_i = (dist <= radius[:, None]).sum(1).to(torch.float64)
    psi = torch.special.digamma
    mi = float(psi(torch.tensor(float(n), dtype=torch.float64)) + psi(k_i).mean()
               - psi(n_c).mean() - psi(m_i).mean())
    return min(max(mi, 0.0), _spectrum_entropy(_proportions(labels), 1.0))


def _mi_gaussian(x: Tensor, y: Tensor) -> float:
    z = _standardize(torch.cat([x, y], dim=1))
    corr = z.T @ z / (z.shape[0] - 1)
    corr = corr + GAUSSIAN_RIDGE * torch.eye(corr.shape[0], dtype=corr.dtype, device=corr.device)
    d = x.shape[1]

    def logdet(m: Tensor) -> float:
        return 2.0 * float(torch.linalg.cholesky(m).diagonal().log().sum())

    mi = 0.5 * (logdet(corr[:d, :d]) + logdet(corr[d:, d:]) - logdet(corr))
    return max(mi, 0.0)


# ----------------------------------------------------------------------------- dependence, rank


def hsic(x: Tensor, y: Tensor, sigma: float | str | None = None,
         normalized: bool = True) -> float:
    """Hilbert-Schmidt independence criterion (Gretton et al. 2005), biased estimator.

    ``HSIC = trace(K H L H) / (N - 1)^2`` with Gaussian kernels (bandwidth default
    ``"median"``, per variable) and the delta kernel for integer labels. The biased
    estimator is >= 0 and is about ``trace(K H) trace(L H) / N^3`` for independent data, so it
    shrinks like 1/N. With ``normalized=True`` it returns
    ``HSIC(x, y) / sqrt(HSIC(x, x) HSIC(y, y))`` (kernel CKA) in ``[0, 1]``: 1 when ``x`` and
    ``y`` have the same centred Gram matrix, 0 when either is constant; for independent
    ``x ~ N(0, I_4)`` and 10 labels at N = 500 it measures about 0.003. Cost O(N^2 (D + D')).

    Args:
        x: ``[N, D]`` activations.
        y: ``[N]`` integer labels, or ``[N, D']`` / ``[N]`` float features.
        sigma: Bandwidth or rule (see the module docstring) for x and float y.
        normalized: Return the normalised (CKA) value instead of raw HSIC.

    Returns:
        HSIC or its normalised value.

    Raises:
        ConfigError: Bad shapes, N mismatch, non-finite values or bad ``sigma``.
    """
    x = _as_features(x)
    target, is_labels = _as_target(y, x.shape[0])
    kc = _centre(_gaussian_gram(x, sigma, "median"))
    lc = _centre(_delta_gram(target) if is_labels else _gaussian_gram(target, sigma, "median"))
    scale = (x.shape[0] - 1) ** 2
    hxy = max(float((kc * lc).sum()) / scale, 0.0)
    if not normalized:
        return hxy
    denom = math.sqrt(float((kc * kc).sum()) * float((lc * lc).sum())) / scale
    return min(hxy / denom, 1.0) if denom > 0 else 0.0


def _centre(gram: Tensor) -> Tensor:
    """``H K H`` with ``H = I - 11^T / N``."""
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def effective_rank(x: Tensor) -> float:
    """Effective rank (Roy and Vetterli, 2007) of the centred activations.

    ``exp(H(p))`` with ``p`` the singular values of ``x - mean(x)`` divided by their sum: a
    continuous rank in ``[1, min(N - 1, D)]``, equal to r when r directions carry equal
    energy and smaller when energy is uneven; 0 for constant ``x`` (a zero matrix). Singular
    values below ``max(N, D) * eps * s_max``, with ``eps`` of the input's dtype, count as 0, so
    exactly rank-r data gives at most r. Cost O(N D min(N, D)).

    Raises:
        ConfigError: Bad shape, N < 2 or non-finite values.
    """
    eps = torch.finfo(x.dtype).eps if isinstance(x, Tensor) and x.is_floating_point() else 0.0
    x = _as_features(x)
    s = torch.linalg.svdvals(x - x.mean(0))
    s = torch.where(s > max(x.shape) * eps * s.max(), s, torch.zeros_like(s))
    if float(s.sum()) == 0.0:
        return 0.0
    p = s[s > 0] / s.sum()
    return math.exp(float(-(p * p.log()).sum()))
