"""An ingress process for the resume tests: what a cluster ingress replica runs, minus Ray.

    python -m tests.integration.journal_ingress REDIS_URL NAMESPACE [TOKEN_DELAY_S]

Life: ClusterBackend (the ingress's own backend: journal and all) over an orchestrator whose
aggregated stage is an in-process LLMServer, behind the real HTTP and gRPC front doors on free
loopback ports (its /metrics shows the stage's KV blocks); the journal is the real one on the given
redis-server. It prints
`ready HTTP_PORT GRPC_PORT` and serves until killed — the test SIGKILLs it mid-stream, as an
ingress replica dies. TOKEN_DELAY_S paces the stage's token stream (sleep per engine step) so a
stream is provably still running when the test kills the process, on a machine of any speed.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading

import uvicorn


async def main(redis_url: str, namespace: str, delay_s: float) -> None:
    from cluster.redis_store import RedisStore, StoreConfig
    from decoders.model import load_model
    from services.cluster_backend import ClusterBackend
    from services.deployments import LLMServer
    from services.grpc_ingress import start_grpc_server
    from services.http_ingress import build_http_app
    from services.ingress_redis import Journal
    from services.orchestrator import Orchestrator, StageClient, Stages
    from services.api_metrics import ApiMetrics
    from services.stage_loads import StageLoads

    class PacedStage:
        def __init__(self, stage):
            self.stage = stage

        async def generate(self, *args):
            async for item in self.stage.generate(*args):
                await asyncio.sleep(delay_s)
                yield item

        def __getattr__(self, name):          # stats() and the rest: the stage's own
            return getattr(self.stage, name)

    stage = LLMServer("tiny-llava", "aggregated", {"num_kv_blocks": 96, "max_model_len": 256}, transfer="fake")
    client = StageClient(PacedStage(stage), is_handle=False)
    orch = Orchestrator("aggregated", Stages(aggregated=client))
    frontend = load_model("tiny-llava", frontend_only=True)
    backend = ClusterBackend(frontend, orch, "tiny-llava",
                             journal=Journal(RedisStore(StoreConfig(url=redis_url, namespace=namespace))))
    backend.loads = StageLoads({"aggregated": client}).start()     # the stage's queues and KV, in /metrics
    grpc_server = await start_grpc_server(backend)
    http = uvicorn.Server(uvicorn.Config(build_http_app(backend, metrics=ApiMetrics(backend)), host="127.0.0.1",
                                         port=0, log_level="warning"))
    task = asyncio.create_task(http.serve())
    while not http.started:
        await asyncio.sleep(0.05)
    print(f"ready {http.servers[0].sockets[0].getsockname()[1]} {grpc_server.port}", flush=True)
    await task


if __name__ == "__main__":
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()  # parent gone: exit
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
