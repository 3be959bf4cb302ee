"""PNG figures of `trisect bench serve` (matplotlib, a dev dependency; imported only when drawing).

  latency_cdf.png  CDFs of TTFT, TPOT, ITL and E2E, one line per server and swept point;
  vs_rate.png      SLO attainment (goodput marked), achieved req/s and p90 TTFT against offered rate.
"""
from __future__ import annotations

import math
import os


def _cdf(ax, xs: list[float], label: str) -> None:
    xs = sorted(xs)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label, lw=1.2)


def _point_label(p) -> str:
    rate = "inf" if math.isinf(p.rate) else f"{p.rate:g}"
    return f"{rate}/s" + (f" c{p.concurrency}" if p.concurrency else "")


def draw(runs, out_dir: str, slo_ttft_ms: float, slo_tpot_ms: float) -> list[str]:
    """runs: objects with .name, .points (PointSummary), .results (per point), .goodput; returns paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    metrics = (("TTFT", lambda r: [r.ttft]), ("TPOT", lambda r: [r.tpot] if r.output_tokens > 1 else []),
               ("ITL", lambda r: r.itl), ("E2E", lambda r: [r.e2e]))
    for ax, (name, get) in zip(axes.flat, metrics):
        for run in runs:
            for p, results in zip(run.points, run.results):
                _cdf(ax, [x * 1e3 for r in results if r.ok for x in get(r)], f"{run.name} @ {_point_label(p)}")
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes[0][0].axvline(slo_ttft_ms, color="k", ls=":", lw=1)
    axes[0][1].axvline(slo_tpot_ms, color="k", ls=":", lw=1)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    cdf_path = os.path.join(out_dir, "latency_cdf.png")
    fig.savefig(cdf_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for run in runs:
        pts = sorted(run.points, key=lambda p: p.x)
        xs = [p.x for p in pts]
        line, = axes[0].plot(xs, [p.slo_attainment * 100 for p in pts], "o-", label=f"{run.name}")
        if run.goodput > 0:
            axes[0].axvline(run.goodput, color=line.get_color(), ls="--", lw=1)
        axes[1].plot(xs, [p.request_throughput for p in pts], "o-", label=run.name)
        axes[2].plot(xs, [p.latency_ms["ttft"]["p90"] for p in pts], "o-", label=run.name)
    axes[0].axhline(90, color="k", ls=":", lw=1)
    axes[0].set_ylabel("requests meeting both SLOs (%)  — dashed: goodput")
    axes[1].set_ylabel("achieved req/s")
    axes[2].set_ylabel("TTFT p90 (ms)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("offered req/s (unbounded points: achieved)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    rate_path = os.path.join(out_dir, "vs_rate.png")
    fig.savefig(rate_path, dpi=110)
    plt.close(fig)
    return [cdf_path, rate_path]
