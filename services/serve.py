"""`trisect serve`: bring up the serving stack and keep it up until interrupted.

Cluster modes (`aggregated`, `pd`, `epd` — default `epd`): start a local Ray head whose logical
resources `encode_pool` / `prefill_pool` / `decode_pool` make placement by pool real on one box
(or join `RAY_ADDRESS`), deploy `build_app(config)` on Ray Serve — HTTP through Serve's proxy,
gRPC from the ingress replica — and wait for Ctrl-C / SIGTERM, then shut Serve and Ray down.
`--mode local` skips Ray: one in-process engine behind the same gRPC and HTTP ingresses.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import threading

from cluster.config import ClusterConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="trisect serve", description="serve a multimodal model")
    ap.add_argument("--config", help="YAML ClusterConfig; flags given explicitly override it")
    ap.add_argument("--model", help="preset name (tiny-llava, tiny-qwen2-vl) or a local HF checkpoint dir")
    ap.add_argument("--mode", choices=["aggregated", "pd", "epd", "local"])
    ap.add_argument("--encoders", type=int, help="encode replicas (epd)")
    ap.add_argument("--prefills", type=int, help="prefill replicas (pd, epd)")
    ap.add_argument("--decoders", type=int, help="decode replicas (pd, epd)")
    ap.add_argument("--transfer", choices=["objectstore", "shm", "collective", "fake"],
                    help="KV P→D: objectstore (default, any node), shm (same node, fastest), collective")
    ap.add_argument("--host", help="bind address of gRPC and HTTP (config bind_host; default 127.0.0.1)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int)
    ap.add_argument("--kv-cache-memory", type=int, help="MiB of KV cache per engine")
    ap.add_argument("--object-store-memory", type=int, help="MiB of plasma store of the local Ray head (2048)")
    ap.add_argument("--redis-url", help="an existing Redis; without it a private redis-server is started")
    ap.add_argument("--role-switching", choices=["on", "off"],
                    help="prefill/decode replicas switch role live under the SLO controller (default on in pd/epd)")
    ap.add_argument("--api-keys", help="comma-separated API keys (env TRISECT_API_KEYS)")
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> ClusterConfig:
    base = ClusterConfig.from_yaml(args.config).to_dict() if args.config else {"mode": "epd"}
    flags = {"model": args.model, "mode": None if args.mode == "local" else args.mode, "transfer": args.transfer,
             "grpc_port": args.grpc_port, "bind_host": args.host, "kv_cache_memory_mib": args.kv_cache_memory, "redis_url": args.redis_url,
             "object_store_memory_mib": args.object_store_memory,
             "role_switching": None if args.role_switching is None else args.role_switching == "on",
             "api_keys": args.api_keys.split(",") if args.api_keys else None}
    base.update({k: v for k, v in flags.items() if v is not None})
    stages = base.setdefault("stages", {})
    for stage, n in (("encode", args.encoders), ("prefill", args.prefills), ("decode", args.decoders)):
        if n is not None:
            stages[stage] = {**stages.get(stage, {}), "replicas": n}
    return ClusterConfig.from_dict(base)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def serve_cluster(cfg: ClusterConfig, host: str, http_port: int) -> None:
    import ray
    from ray import serve

    from services.app import build_app
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        pools = {p: 64 for p in ("encode_pool", "prefill_pool", "decode_pool", "llm_pool")}
        # Prometheus scrapes every series (docs/metrics.md) from the head's metrics export port
        metrics_port = int(os.environ.get("TRISECT_METRICS_EXPORT_PORT", "8080"))
        ray.init(resources=pools, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
                 _metrics_export_port=metrics_port, **cfg.ray_head_options())
        print(f"Prometheus metrics: http://{host}:{metrics_port}/metrics (Ray's metrics export)", flush=True)
    try:
        serve.start(http_options={"host": host, "port": http_port})
        print(f"deploying {cfg.model} in {cfg.mode} mode: "
              + ", ".join(f"{n}={s.replicas if not s.autoscaling else s.autoscaling}"
                          for n, s in cfg.stages.items() if n in cfg.stage_names()), flush=True)
        serve.run(build_app(cfg), name="trisect", route_prefix="/")
        grpc = f"gRPC {host}:{cfg.grpc_port}  " if cfg.grpc_port else ""
        print(f"trisect serving {cfg.model} ({cfg.mode}): {grpc}HTTP http://{host}:{http_port}/v1", flush=True)
        _wait_for_signal()
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


async def serve_local(cfg: ClusterConfig, host: str, http_port: int) -> None:
    import uvicorn

    from decoders.config import EngineConfig
    from decoders.model import load_model
    from services.api_metrics import ApiMetrics
    from services.auth import ApiKeys
    from services.grpc_ingress import start_grpc_server
    from services.http_ingress import build_http_app
    from services.local_backend import LocalBackend

    auth = ApiKeys(cfg.api_keys) if cfg.api_keys else ApiKeys.from_env()
    print(f"loading {cfg.model} ...", flush=True)
    backend = LocalBackend(load_model(cfg.model, cache_dir=cfg.cache_dir), EngineConfig(**cfg.engine()), cfg.limits,
                           model_name=cfg.model)
    metrics = ApiMetrics(backend)
    from services import request_log, stage_metrics
    request_log.setup()
    ingress_sampler = stage_metrics.watch_ingress(backend, "local")
    grpc_server = await start_grpc_server(backend, f"{host}:{cfg.grpc_port or 50051}", auth, metrics)
    http = uvicorn.Server(uvicorn.Config(build_http_app(backend, auth, metrics), host=host, port=http_port,
                                         log_level="warning"))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    http_task = asyncio.create_task(http.serve())
    print(f"trisect serving {cfg.model} (local): gRPC {host}:{grpc_server.port}  HTTP http://{host}:{http_port}/v1",
          flush=True)
    await stop.wait()
    await grpc_server.stop(grace=10)
    http.should_exit = True
    await http_task
    ingress_sampler.close()
    backend.close()


def passive_omp_workers() -> bool:
    """Idle OpenMP workers sleep instead of spinning, in this process and the Ray workers it starts.

    torch's libgomp lets a worker spin ~300,000 iterations (milliseconds) after each parallel
    region before it sleeps. A decode step is mostly Python between small ops, so in a server the
    second OpenMP thread spins through nearly the whole step: on 2 cores it takes the core that the
    HTTP/gRPC event loop (and, on one box, the other stages and the client) need, and each of them
    then waits for a time slice. On the 2-core development machine, busy, a decode step burnt 3x
    (1 row) to 7–10x (8 rows) the CPU of one whose workers sleep, and took 3–20x as long; served
    under that load, saturated req/s rose 1.8x. Quiet, the two measured within noise (see
    docs/benchmarks.md). The policy changes how threads wait, never how work is split: results
    are bit-identical.
    Must run before torch is imported (libgomp reads it once); an explicit OMP_WAIT_POLICY or
    GOMP_SPINCOUNT in the environment wins. Returns whether it set the policy."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"   # inherited by the Ray head and its workers
    return True


def main(argv: list[str] | None = None) -> int:
    passive_omp_workers()
    args = parse_args(argv)
    cfg = build_config(args)
    if args.mode == "local":
        asyncio.run(serve_local(cfg, cfg.bind_host, args.http_port))
        return 0
    if cfg.redis_url:
        serve_cluster(cfg, cfg.bind_host, args.http_port)
        return 0
    from cluster.redis_server import RedisServer
    with RedisServer() as redis:               # private, loopback, stopped on exit
        print(f"started a private redis-server at {redis.url}", flush=True)
        cfg.redis_url = redis.url
        serve_cluster(cfg, cfg.bind_host, args.http_port)
    return 0



