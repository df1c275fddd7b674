"""Scaling-curve fits with confidence intervals: log-linear and power law, by ordinary least squares.

    fit = fit_curve(x=[1e3, 1e4, 1e5], y=[0.41, 0.47, 0.52], kind="loglinear")   # y = a + b log10(x)
    fit.params, fit.ci["b"], fit.predict([1e6]), fit.band([1e6])                  # band: CI of the mean
    fit.inverse(0.5)                                                              # x where the curve reaches y

Kinds (each a straight line in transformed coordinates, fitted by OLS there):

- ``loglinear``: ``y = a + b log10 x`` (the usual data-scaling plot: metric against log samples);
- ``powerlaw``: ``y = a x^b`` (``log10 y = log10 a + b log10 x``; needs y > 0, e.g. an RMSE);
- ``powerlaw_gap``: ``ceiling - y = a x^b`` (a metric approaching a known ceiling, e.g. accuracy 1.0).

Confidence intervals are Student-t intervals of the OLS coefficients (``n - 2`` degrees of freedom, all
observations used, so repeated seeds at one x add degrees of freedom); the band is the t-interval of the
fitted mean. With two points there is no interval (NaN), and the report says so. Student-t quantiles come
from scipy when it is installed, else from the exact closed form of the t CDF for integer degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

FitKind = Literal["loglinear", "powerlaw", "powerlaw_gap"]
KINDS: tuple[str, ...] = ("loglinear", "powerlaw", "powerlaw_gap")


# ------------------------------------------------------------------------------------- Student t


def t_cdf(t: float, dof: int) -> float:
    """CDF of Student's t with integer ``dof`` (Abramowitz & Stegun 26.7.3 / 26.7.4, exact)."""
    if dof < 1:
        raise ValueError(f"dof: must be >= 1, got {dof}")
    theta = math.atan2(abs(t), math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    if dof % 2 == 1:
        total, term = 0.0, 0.0
        if dof > 1:
            term = c
            total = c
            for k in range(1, (dof - 3) // 2 + 1):
                term *= c * c * (2 * k) / (2 * k + 1)
                total += term
        a = 2.0 / math.pi * (theta + s * total)
    else:
        term, total = 1.0, 1.0
        for k in range(1, (dof - 2) // 2 + 1):
            term *= c * c * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    a = min(1.0, max(0.0, a))  # P(|T| < |t|)
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom."""
    if not 0 < p < 1:
        raise ValueError(f"p: must be in (0, 1), got {p}")
    try:
        from scipy import stats

        return float(stats.t.ppf(p, dof))
    except ImportError:
        pass
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class Fit:
    """A fitted curve; parameters ``a`` and ``b`` as in the module docstring."""

    kind: str
    params: dict[str, float]
    stderr: dict[str, float]
    ci: dict[str, tuple[float, float]]
    level: float
    n: int
    dof: int
    r2: float
    x_range: tuple[float, float]
    ceiling: float | None = None
    cov: tuple[tuple[float, float], tuple[float, float]] = ((math.nan, math.nan), (math.nan, math.nan))
    residual_std: float = math.nan
    notes: list[str] = field(default_factory=list)

    # transformed coordinates: u = log10 x, v = g(y) = a' + b u
    def _v_to_y(self, v: np.ndarray) -> np.ndarray:
        if self.kind == "loglinear":
            return v
        if self.kind == "powerlaw":
            return 10.0**v
        return self.ceiling - 10.0**v  # type: ignore[operator]

    def _y_to_v(self, y: np.ndarray) -> np.ndarray:
        return _transform_y(np.asarray(y, dtype=float), self.kind, self.ceiling)

    def _intercept(self) -> float:
        return self.params["a"] if self.kind == "loglinear" else math.log10(self.params["a"])

    def predict(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        u = np.log10(np.asarray(x, dtype=float))
        return self._v_to_y(self._intercept() + self.params["b"] * u)

    def band(self, x: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper ``level`` confidence band of the fitted mean at ``x`` (NaN without dof)."""
        u = np.log10(np.asarray(x, dtype=float))
        v = self._intercept() + self.params["b"] * u
        if self.dof < 1:
            nan = np.full_like(v, math.nan)
            return nan, nan
        cov = np.asarray(self.cov)
        se = np.sqrt(np.maximum(0.0, cov[0, 0] + 2 * cov[0, 1] * u + cov[1, 1] * u * u))
        q = t_quantile(0.5 + self.level / 2, self.dof)
        ya, yb = self._v_to_y(v - q * se), self._v_to_y(v + q * se)
        return np.minimum(ya, yb), np.maximum(ya, yb)

    def inverse(self, y: float) -> float:
        """The x at which the fitted curve reaches ``y`` (NaN for a flat curve or y out of the range)."""
        b = self.params["b"]
        if b == 0 or not math.isfinite(b):
            return math.nan
        with np.errstate(all="ignore"):
            v = float(self._y_to_v(np.array([y]))[0])
        if not math.isfinite(v):
            return math.nan
        return float(10.0 ** ((v - self._intercept()) / b))

    def formula(self) -> str:
        a, b = self.params["a"], self.params["b"]
        if self.kind == "loglinear":
            return f"y = {a:.4g} + {b:.4g} log10(x)"
        if self.kind == "powerlaw":
            return f"y = {a:.4g} x^{b:.4g}"
        return f"y = {self.ceiling:g} - {a:.4g} x^{b:.4g}"

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "formula": self.formula(),
            "a": self.params["a"],
            "b": self.params["b"],
            "a_stderr": self.stderr["a"],
            "b_stderr": self.stderr["b"],
            "a_ci": list(self.ci["a"]),
            "b_ci": list(self.ci["b"]),
            "level": self.level,
            "n": self.n,
            "dof": self.dof,
            "r2": self.r2,
            "x_min": self.x_range[0],
            "x_max": self.x_range[1],
            "ceiling": self.ceiling,
            "notes": list(self.notes),
        }


def _transform_y(y: np.ndarray, kind: str, ceiling: float | None) -> np.ndarray:
    if kind == "loglinear":
        return y
    if kind == "powerlaw":
        return np.log10(y)
    return np.log10(ceiling - y)  # type: ignore[operator]


def fit_curve(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    kind: str = "loglinear",
    level: float = 0.95,
    ceiling: float | None = None,
) -> Fit:
    """Fit ``kind`` to the points (x, y) by OLS in transformed coordinates; see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {list(KINDS)}, got {kind!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError("x and y must be 1-d and of the same length")
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if np.any(xs <= 0):
        raise ValueError("x: every value must be > 0 (it is put on a log scale)")
    if kind == "powerlaw" and np.any(ys <= 0):
        raise ValueError(
            "y: a power law y = a x^b needs y > 0 (try loglinear, or powerlaw_gap with a ceiling)"
        )
    if kind == "powerlaw_gap":
        if ceiling is None:
            raise ValueError("ceiling: powerlaw_gap needs the metric's ceiling (e.g. 1.0 or 100)")
        if np.any(ys >= ceiling):
            raise ValueError(f"y: powerlaw_gap needs every y below the ceiling {ceiling}")
    if len(np.unique(xs)) < 2:
        raise ValueError("x: need at least two distinct x values to fit a curve")
    u = np.log10(xs)
    v = _transform_y(ys, kind, ceiling)
    design = np.stack([np.ones_like(u), u], axis=1)
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    resid = v - design @ coef
    n = len(u)
    dof = n - 2
    xtx_inv = np.linalg.inv(design.T @ design)
    notes: list[str] = []
    if dof >= 1:
        s2 = float(resid @ resid) / dof
        cov = s2 * xtx_inv
        se = np.sqrt(np.diag(cov))
        q = t_quantile(0.5 + level / 2, dof)
        ci_v = [(float(coef[i] - q * se[i]), float(coef[i] + q * se[i])) for i in range(2)]
        residual_std = math.sqrt(s2)
    else:
        cov = np.full((2, 2), math.nan)
        se = np.array([math.nan, math.nan])
        ci_v = [(math.nan, math.nan)] * 2
        residual_std = math.nan
        notes.append(f"{n} points: a line through them leaves no degrees of freedom, so no interval")
    ss_tot = float(((v - v.mean()) ** 2).sum())
    flat = ss_tot <= 1e-20 * max(1.0, float((v**2).sum()))
    r2 = math.nan if flat else 1.0 - float(resid @ resid) / ss_tot
    if kind == "loglinear":
        params = {"a": float(coef[0]), "b": float(coef[1])}
        stderr = {"a": float(se[0]), "b": float(se[1])}
        ci = {"a": ci_v[0], "b": ci_v[1]}
    else:  # a = 10^intercept; its interval maps through the (monotone) exponential
        params = {"a": float(10.0 ** coef[0]), "b": float(coef[1])}
        stderr = {"a": float(10.0 ** coef[0] * math.log(10) * se[0]), "b": float(se[1])}
        ci = {"a": (10.0 ** ci_v[0][0], 10.0 ** ci_v[0][1]), "b": ci_v[1]}
    return Fit(
        kind=kind,
        params=params,
        stderr=stderr,
        ci=ci,
        level=level,
        n=n,
        dof=dof,
        r2=r2,
        x_range=(float(xs.min()), float(xs.max())),
        ceiling=ceiling,
        cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
        residual_std=residual_std,
        notes=notes,
    )


def data_multiplier(reference: Fit, other: Fit, x: float) -> float:
    """How many times more samples the ``reference`` curve needs to reach ``other``'s fitted value at ``x``
    (> 1: ``other`` is more data-efficient). NaN when the reference curve is flat or never gets there."""
    target = float(other.predict([x])[0])
    needed = reference.inverse(target)
    return needed / x if math.isfinite(needed) else math.nan


def mean_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``b`` minus mean of ``a`` with a Welch t-interval (NaN interval with fewer than 2 per side)."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(xb.mean() - xa.mean())
    out = {"diff": diff, "lo": math.nan, "hi": math.nan, "n_a": len(xa), "n_b": len(xb)}
    if len(xa) < 2 or len(xb) < 2:
        return out
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        out.update(lo=diff, hi=diff)
        return out
    dof = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    q = t_quantile(0.5 + level / 2, max(1, int(math.floor(dof))))
    out.update(lo=diff - q * se, hi=diff + q * se)
    return out


__all__ = ["KINDS", "Fit", "data_multiplier", "fit_curve", "mean_difference", "t_cdf", "t_quantile"]
