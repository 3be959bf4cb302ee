"""A private local Ray + Serve per cluster test module (other modules start their own Ray): its own temp dir, the three pools as
logical resources (placement by pool is real on one box), HTTP proxy on a free loopback port."""
import shutil
import socket
import tempfile

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_cluster():
    import ray
    from ray import serve
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: Ray's socket paths are length-limited
    port = free_port()
    # a bounded store, as `trisect serve` starts: prefill/decode replicas prefault all of it (256 MiB
    # is plenty for tiny-model KV; Ray's default, 30% of RAM, would make that seconds and gigabytes)
    # llm_pool: with Redis, pd/epd default to role switching (one LLMPool deployment on that pool)
    ray.init(num_cpus=2, resources={"encode_pool": 8, "prefill_pool": 8, "decode_pool": 8, "llm_pool": 8},
             _temp_dir=tmp, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=256 * 2**20,
             # replicas push metrics to the export port every second, not 10 (tests/cluster/test_metrics_*)
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
