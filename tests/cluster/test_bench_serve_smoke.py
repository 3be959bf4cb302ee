"""`trisect bench serve` end to end on a short trace against a real local Ray Serve cluster
(aggregated), over OpenAI HTTP and over trisect gRPC in one command: every request completes with
the asked number of tokens, the timings are consistent, and the JSON, the table and the plots come out.
"""
import json

import pytest
from ray import serve

from cluster.config import ClusterConfig
from services.app import build_app
from services.bench.serve import main as bench_serve
from tests.cluster.conftest import free_port

pytestmark = pytest.mark.slow


def test_bench_serve_drives_http_and_grpc(serve_cluster, tiny_llava, tmp_path, capsys):
    grpc_port = free_port()
    cfg = ClusterConfig(model=str(tiny_llava.path), mode="aggregated", grpc_port=grpc_port, kv_cache_memory_mib=32)
    serve.run(build_app(cfg), name="bench-serve", route_prefix="/bench-serve")
    out = tmp_path / "serve.json"
    rc = bench_serve(["--model", str(tiny_llava.path), "--base-url", f"{serve_cluster}/bench-serve", "--label", "http",
                      "--grpc", f"127.0.0.1:{grpc_port}", "-n", "4", "--input-len", "24", "--output-len", "5",
                      "--images", "0,1", "--rates", "20,inf", "--warmup", "1", "--slo-ttft-ms", "60000",
                      "--slo-tpot-ms", "60000", "--json", str(out), "--plots", str(tmp_path / "plots")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["runs"]] == ["http", "grpc"]
    for run in report["runs"]:
        assert [p["rate"] for p in run["points"]] == [20.0, None]       # None: inf
        for p in run["points"]:
            assert (p["completed"], p["failed"]) == (4, 0), p["errors"]
            assert p["slo_attainment"] == 1.0
            lat = p["latency_ms"]
            assert 0 < lat["ttft"]["p50"] <= lat["ttft"]["p90"] <= lat["ttft"]["p99"] <= lat["e2e"]["p99"]
            for r in p["requests"]:
                assert r["output_tokens"] == 5                           # eos ignored, greedy
                assert r["prompt_tokens"] >= 24
                assert r["e2e_ms"] >= r["ttft_ms"] and r["tpot_ms"] > 0
        assert run["goodput_how"] == "at least"
    printed = capsys.readouterr().out
    assert "ratios to http" in printed and "| grpc |" in printed
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 0
    assert (tmp_path / "plots" / "vs_rate.png").stat().st_size > 0
    serve.delete("bench-serve")
