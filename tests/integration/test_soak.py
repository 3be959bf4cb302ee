"""Soaks of CI, ≤ 60 s of load each, judged by `trisect bench soak`'s own verdict: after the load no
KV block held, no request in flight, no descriptor or process more than at the post-warm-up
baseline, total RSS growth under 5%, no failed request — and no new TTL-less Redis key.

1. `trisect bench soak --minutes 1` against a real `trisect serve --mode local` child on loopback
   (15 s warm-up, 45 s measured, 3 clients back to back, half the requests with an image).
   `--mode local` keeps nothing in Redis.
2. 30 s against the ingress of the cluster modes with its Redis journal on a real redis-server (a
   ClusterBackend process over an in-process aggregated stage, tests/integration/journal_ingress.py;
   Ray is left out to keep it cheap): every request writes journal keys, all of which must carry a
   TTL, and once the requests ended, one of at most the 60 s a closed journal is kept.
"""
import uuid

from services.bench import soak
from tests.integration.test_resume import Ingress


def judged(argv):
    result, checks = soak.run(soak.parse_args(argv))
    print(soak.report(result, checks))
    assert result["ok"] > 10 and len(result["samples"]) >= 3
    failed = {name: what for name, (ok, what) in checks.items() if not ok}
    assert not failed, failed
    return result


def test_a_one_minute_soak_of_trisect_serve_leaks_nothing(trisect_cache, monkeypatch):
    monkeypatch.setenv("TRISECT_CACHE", str(trisect_cache))
    judged(["--minutes", "1", "--warmup-s", "15", "--sample-every", "5", "--concurrency", "3",
            "--serve-arg=--kv-cache-memory", "--serve-arg=64"])


def test_a_soak_of_the_journaling_ingress_leaves_no_redis_key_without_ttl(redis_server, trisect_cache, monkeypatch):
    monkeypatch.setenv("TRISECT_CACHE", str(trisect_cache))
    namespace = "soak" + uuid.uuid4().hex[:8]
    ingress = Ingress(redis_server.url, namespace, 0.0, trisect_cache)
    try:
        result = judged(["--attach", f"http://127.0.0.1:{ingress.http}", "--pid", str(ingress.proc.pid),
                         "--redis-url", redis_server.url, "--redis-match", f"{namespace}:*", "--minutes", "0.5",
                         "--warmup-s", "10", "--sample-every", "4", "--concurrency", "3"])
        # every request has ended: each of its keys expires within the 60 s a closed journal is kept,
        # so the key count is bounded by the requests of the last minute
        import redis
        r = redis.Redis.from_url(redis_server.url)
        ttls = [r.pttl(k) for k in r.scan_iter(match=f"{namespace}:*", count=1000)]
        r.close()
    finally:
        ingress.kill()
    assert max(s.redis_keys for s in result["samples"]) > 0 and ttls     # the journal was written all along
    assert all(0 < t <= 60_000 for t in ttls), sorted(ttls)[-5:]
