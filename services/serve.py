"""`trisect serve`: bring up the serving stack and keep it up until interrupted.

`--mode aggregated` (the default until the Ray Serve deployments land) runs one in-process engine
behind the gRPC and OpenAI-compatible HTTP ingresses: model load → engine thread → both servers
listening → Ctrl-C / SIGTERM → health flips to NOT_SERVING, in-flight streams drain, exit.
"""
from __future__ import annotations

import argparse
import asyncio
import signal

from decoders.config import EngineConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="trisect serve", description="serve a multimodal model")
    ap.add_argument("--model", default="tiny-llava", help="preset name or path of a local HF checkpoint")
    ap.add_argument("--mode", default="aggregated", choices=["aggregated"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, default=50051)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--kv-cache-memory", type=int, default=256, help="MiB of KV cache per engine")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--api-keys", default=None, help="comma-separated API keys (env TRISECT_API_KEYS)")
    return ap.parse_args(argv)


def engine_config(args: argparse.Namespace, role: str = "aggregated") -> EngineConfig:
    return EngineConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory * 2**20,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        role=role)


async def serve_aggregated(args: argparse.Namespace) -> None:
    import uvicorn

    from decoders.model import load_model
    from services.api_metrics import ApiMetrics
    from services.auth import ApiKeys
    from services.grpc_ingress import start_grpc_server
    from services.http_ingress import build_http_app
    from services.local_backend import LocalBackend

    auth = ApiKeys(args.api_keys.split(",")) if args.api_keys else ApiKeys.from_env()
    print(f"loading {args.model} ...", flush=True)
    backend = LocalBackend(load_model(args.model), engine_config(args), model_name=args.model)
    metrics = ApiMetrics(backend)
    grpc_server = await start_grpc_server(backend, f"{args.host}:{args.grpc_port}", auth, metrics)
    http = uvicorn.Server(uvicorn.Config(build_http_app(backend, auth, metrics), host=args.host,
                                         port=args.http_port, log_level="warning"))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    http_task = asyncio.create_task(http.serve())
    print(f"trisect serving {args.model} ({args.mode}): gRPC {args.host}:{grpc_server.port}  "
          f"HTTP http://{args.host}:{args.http_port}/v1", flush=True)
    await stop.wait()
    print("shutting down: draining in-flight requests", flush=True)
    await grpc_server.stop(grace=10)
    http.should_exit = True
    await http_task
    backend.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    asyncio.run(serve_aggregated(args))
    return 0
