"""Statistics for the seeded distribution tests: two-sample chi-square, Kolmogorov-Smirnov against the Gumbel law."""
from __future__ import annotations

import math

import torch

ALPHA = 1e-4  # per chi-square test; the tests are seeded, so a pass is reproducible


def chi2_sf(stat: float, df: int) -> float:
    """Chi-square survival function: scipy when installed, else the Wilson-Hilferty normal approximation."""
    if df <= 0:
        return 1.0
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, df))
    except ImportError:  # pragma: no cover - scipy is a dev dependency
        z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        return 0.5 * math.erfc(z / math.sqrt(2))


def two_sample_chi2(a: torch.Tensor, b: torch.Tensor, min_count: int = 10) -> tuple[float, int, float]:
    """Are the category counts a [C] and b [C] drawn from one distribution? Returns (stat, df, p).

    Cells with fewer than ``min_count`` observations in total are pooled into one cell."""
    a, b = a.double().flatten(), b.double().flatten()
    small = (a + b) < min_count
    a = torch.cat([a[~small], a[small].sum().view(1)])
    b = torch.cat([b[~small], b[small].sum().view(1)])
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    stat = float((((nb / na).sqrt() * a - (na / nb).sqrt() * b) ** 2 / (a + b)).sum())
    df = int(keep.sum()) - 1
    return stat, df, chi2_sf(stat, df)


def assert_same_distribution(x: torch.Tensor, y: torch.Tensor, n_tokens: int, name: str = "") -> None:
    """Per-position and adjacent-pair token counts of samples x [n, L] and y [m, L] agree (chi-square)."""
    x, y = x.cpu(), y.cpu()
    L = x.shape[1]
    failures = []
    for i in range(L):
        ca = torch.bincount(x[:, i], minlength=n_tokens)
        cb = torch.bincount(y[:, i], minlength=n_tokens)
        stat, df, p = two_sample_chi2(ca, cb)
        if p < ALPHA:
            failures.append(f"position {i}: chi2 {stat:.1f} df {df} p {p:.2g}")
    for i in range(L - 1):
        ca = torch.bincount(x[:, i] * n_tokens + x[:, i + 1], minlength=n_tokens**2)
        cb = torch.bincount(y[:, i] * n_tokens + y[:, i + 1], minlength=n_tokens**2)
        stat, df, p = two_sample_chi2(ca, cb)
        if p < ALPHA:
            failures.append(f"pair ({i}, {i + 1}): chi2 {stat:.1f} df {df} p {p:.2g}")
    assert not failures, f"{name}: sample distributions differ: " + "; ".join(failures)


def assert_same_counts(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    """Two samples of small non-negative integers (e.g. per-row E-NFE) have one distribution."""
    n = int(max(a.max(), b.max())) + 1
    stat, df, p = two_sample_chi2(torch.bincount(a.cpu(), minlength=n), torch.bincount(b.cpu(), minlength=n))
    assert p >= ALPHA, f"{name}: count distributions differ (chi2 {stat:.1f}, df {df}, p {p:.2g})"


def ks_gumbel(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample x to the standard Gumbel CDF exp(-exp(-x))."""
    x = x.double().flatten().sort().values
    n = x.numel()
    cdf = torch.exp(-torch.exp(-x))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def ks_critical(n: int, alpha: float = ALPHA) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2)) / math.sqrt(n)
