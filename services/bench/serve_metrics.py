"""The arithmetic of `trisect bench serve`: one request's timings, one rate's summary, goodput.

Life: a load driver fills one `RequestResult` per request (send time, the arrival time of every
streamed chunk that carried output, the output token count); `summarize` turns one swept point's
results into a `PointSummary` (latency percentiles, throughput, SLO attainment); `goodput` reads the
attainment of every swept point and returns the highest rate at which at least 90% of requests met
both SLOs, interpolated linearly between the swept rates around the crossing.

Definitions follow vLLM's `bench serve`, so its figures and ours read alike:
  TTFT  first output chunk - send;        E2E  end of stream - send;
  TPOT  (E2E - TTFT) / (output tokens - 1), per request;
  ITL   the gaps between successive output chunks, pooled over requests;
  percentiles interpolate linearly between order statistics (numpy's default, as vLLM's).
A failed request counts in attainment as a miss and in no latency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

QUANTILES = (0.5, 0.9, 0.99)
ATTAINMENT_TARGET = 0.9


def quantile(xs, q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), q in [0, 1]; nan if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it. Times are seconds on one monotonic clock."""
    sent: float
    chunk_times: list[float] = field(default_factory=list)   # arrival of each chunk that carried output
    end: float = 0.0                                          # stream closed
    output_tokens: int = 0                                    # the server's count (usage), else chunks
    prompt_tokens: int = 0
    error: str = ""                                           # empty: succeeded

    def __post_init__(self):
        if any(b < a for a, b in zip(self.chunk_times, self.chunk_times[1:])):
            raise ValueError("chunk_times must be non-decreasing")
        if self.output_tokens < 0 or self.prompt_tokens < 0:
            raise ValueError("token counts are non-negative")

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2e(self) -> float:
        return max(self.end, self.chunk_times[-1]) - self.sent

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 with one token: nothing to average)."""
        n = max(self.output_tokens, len(self.chunk_times))
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else 0.0

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    def meets(self, slo_ttft_s: float, slo_tpot_s: float) -> bool:
        return self.ok and self.ttft <= slo_ttft_s and self.tpot <= slo_tpot_s


@dataclass(slots=True)
class PointSummary:
    """One swept point (an offered rate and/or a concurrency cap) of one server. Latencies in ms."""
    rate: float                 # offered req/s (inf: all at once)
    concurrency: int | None     # in-flight cap, None: uncapped
    completed: int
    failed: int
    duration_s: float
    request_throughput: float   # completed req/s over the point's wall time
    output_throughput: float    # output tok/s
    slo_attainment: float       # share of ALL requests (failed ones miss) meeting both SLOs
    latency_ms: dict[str, dict[str, float]]   # ttft/tpot/itl/e2e -> {"mean", "p50", "p90", "p99"}
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.completed < 0 or self.failed < 0 or self.duration_s < 0:
            raise ValueError("counts and duration are non-negative")
        if not 0.0 <= self.slo_attainment <= 1.0:
            raise ValueError("slo_attainment is a share in [0, 1]")

    @property
    def x(self) -> float:
        """Where this point sits on a rate axis: the offered rate, or what was achieved when the
        offer was unbounded (rate inf, or a concurrency sweep)."""
        return self.request_throughput if math.isinf(self.rate) else self.rate

    def to_dict(self) -> dict:
        return {"rate": None if math.isinf(self.rate) else self.rate, "concurrency": self.concurrency,
                "completed": self.completed, "failed": self.failed, "duration_s": self.duration_s,
                "request_throughput": self.request_throughput, "output_throughput": self.output_throughput,
                "slo_attainment": self.slo_attainment, "latency_ms": self.latency_ms, "errors": self.errors[:10]}


def _stats(xs: list[float]) -> dict[str, float]:
    out = {"mean": sum(xs) / len(xs) * 1e3 if xs else math.nan}
    out.update({f"p{round(q * 100)}": quantile(xs, q) * 1e3 for q in QUANTILES})
    return out


def summarize(results: list[RequestResult], duration_s: float, rate: float, concurrency: int | None,
              slo_ttft_ms: float, slo_tpot_ms: float) -> PointSummary:
    ok = [r for r in results if r.ok]
    met = sum(r.meets(slo_ttft_ms / 1e3, slo_tpot_ms / 1e3) for r in results)
    lat = {"ttft": _stats([r.ttft for r in ok]), "tpot": _stats([r.tpot for r in ok]),
           "itl": _stats([g for r in ok for g in r.itl]), "e2e": _stats([r.e2e for r in ok])}
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return PointSummary(rate=rate, concurrency=concurrency, completed=len(ok), failed=len(results) - len(ok),
                        duration_s=duration_s, request_throughput=len(ok) * per_s,
                        output_throughput=sum(max(r.output_tokens, len(r.chunk_times)) for r in ok) * per_s,
                        slo_attainment=met / len(results) if results else 0.0, latency_ms=lat,
                        errors=[r.error for r in results if r.error])


def goodput(points: list[tuple[float, float]], target: float = ATTAINMENT_TARGET) -> tuple[float, str]:
    """Highest rate with attainment >= target, from (rate, attainment) pairs.

    Returns (rate, how): "interpolated" between the last passing rate and the next (failing) one,
    where the straight line between their attainments crosses the target; "at least" when the
    highest swept rate passes (the true goodput may be higher); "below" (rate 0) when no rate passes.
    """
    pts = sorted(points)
    passing = [i for i, (_, a) in enumerate(pts) if a >= target]
    if not passing:
        return 0.0, "below"
    i = passing[-1]
    if i == len(pts) - 1:
        return pts[i][0], "at least"
    (r0, a0), (r1, a1) = pts[i], pts[i + 1]
    return r0 + (r1 - r0) * (a0 - target) / (a0 - a1), "interpolated"
