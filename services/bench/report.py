"""Tables and JSON of `trisect bench serve`: one block per server, then one side-by-side table.

Life: `bench serve` hands every finished `Run` (a server's sweep in one round) here. `detail` prints
the server's points (latency p50/p90/p99, throughput, SLO attainment) and its goodput; `compare` puts
every server in one markdown table — per point TTFT p50 / TPOT p50 / achieved req/s — and then the
same figures as ratios to a baseline server of the same round (< 1 is faster for latencies,
> 1 better for req/s and goodput).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.bench.serve_metrics import PointSummary, RequestResult


@dataclass(slots=True)
class Run:
    label: str
    target: str
    round: int
    points: list[PointSummary] = field(default_factory=list)
    results: list[list[RequestResult]] = field(default_factory=list)
    goodput: float = 0.0
    goodput_how: str = ""

    @property
    def name(self) -> str:
        return self.label if self.round == 0 else f"{self.label} #{self.round + 1}"

    def to_dict(self) -> dict:
        return {"label": self.label, "target": self.target, "round": self.round, "goodput_req_s": self.goodput,
                "goodput_how": self.goodput_how,
                "points": [dict(p.to_dict(), requests=[_request(r) for r in rs])
                           for p, rs in zip(self.points, self.results)]}


def _request(r: RequestResult) -> dict:
    if not r.ok:
        return {"error": r.error}
    return {"ttft_ms": r.ttft * 1e3, "tpot_ms": r.tpot * 1e3, "e2e_ms": r.e2e * 1e3,
            "output_tokens": r.output_tokens, "prompt_tokens": r.prompt_tokens, "chunks": len(r.chunk_times)}


def point_name(rate: float, concurrency: int | None) -> str:
    return ("inf" if math.isinf(rate) else f"{rate:g}") + " req/s" + (f", ≤{concurrency} in flight" if concurrency else "")


def _tri(d: dict) -> str:
    return "/".join(f"{d[k]:.0f}" if not math.isnan(d[k]) else "-" for k in ("p50", "p90", "p99"))


def detail(run: Run, slo_ttft_ms: float, slo_tpot_ms: float) -> str:
    lines = [f"== {run.name}  ({run.target}) ==",
             f"{'point':<26}{'done':>5}{'fail':>5}{'req/s':>7}{'tok/s':>8}  {'TTFT p50/90/99':>16}"
             f"  {'TPOT p50/90/99':>15}  {'ITL p50/90/99':>15}  {'E2E p50/90/99':>17}  {'SLO ok':>6}"]
    for p in run.points:
        lat = p.latency_ms
        lines.append(f"{point_name(p.rate, p.concurrency):<26}{p.completed:>5}{p.failed:>5}{p.request_throughput:>7.2f}"
                     f"{p.output_throughput:>8.1f}  {_tri(lat['ttft']):>16}  {_tri(lat['tpot']):>15}  "
                     f"{_tri(lat['itl']):>15}  {_tri(lat['e2e']):>17}  {p.slo_attainment:>6.0%}")
        if p.errors:
            lines.append(f"    first error: {p.errors[0]}")
    lines.append(f"goodput (>= 90% meet TTFT <= {slo_ttft_ms:g} ms and TPOT <= {slo_tpot_ms:g} ms): "
                 f"{run.goodput:.2f} req/s ({run.goodput_how})")
    return "\n".join(lines)


def _cells(p: PointSummary) -> tuple[float, float, float]:
    return p.latency_ms["ttft"]["p50"], p.latency_ms["tpot"]["p50"], p.request_throughput


def compare(runs: list[Run], baseline: str) -> str:
    """Markdown: figures per server and point, then ratios to `baseline`'s run of the same round."""
    heads = [point_name(p.rate, p.concurrency) for p in runs[0].points]
    sep = "|---|" + "---:|" * (len(heads) + 1)
    out = ["| server | " + " | ".join(f"{h}: TTFT p50 / TPOT p50 ms / req/s" for h in heads) + " | goodput req/s |",
           sep]
    for run in runs:
        cells = [f"{a:.0f} / {b:.1f} / {c:.2f}" for a, b, c in map(_cells, run.points)]
        out.append(f"| {run.name} | " + " | ".join(cells) + f" | {run.goodput:.2f} |")
    base = {r.round: r for r in runs if r.label == baseline}
    others = [r for r in runs if r.label != baseline and r.round in base]
    if not base or not others:
        return "\n".join(out)
    out += ["", f"ratios to {baseline} (same round): TTFT p50 ×, TPOT p50 ×, req/s ×", "",
            "| server | " + " | ".join(heads) + " | goodput × |", sep]
    for run in others:
        b = base[run.round]
        cells = []
        for p, q in zip(run.points, b.points):
            cells.append(" / ".join(_ratio(x, y) for x, y in zip(_cells(p), _cells(q))))
        out.append(f"| {run.name} | " + " | ".join(cells) + f" | {_ratio(run.goodput, b.goodput)} |")
    return "\n".join(out)


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}" if y and not (math.isnan(x) or math.isnan(y)) else "-"
