"""The 60-second soak of CI: `trisect bench soak --minutes 1` against a real `trisect serve --mode
local` child process on loopback (15 s warm-up, 45 s measured, 3 clients back to back, half the
requests with an image). After the load: no KV block held, no request in flight, no descriptor more
than at the post-warm-up baseline, total RSS growth under 5%, no failed request. (`--mode local`
keeps nothing in Redis; the Redis key check runs in the cluster modes, `--mode aggregated`.)"""
from services.bench import soak


def test_a_one_minute_soak_leaks_nothing(trisect_cache, monkeypatch, capsys):
    monkeypatch.setenv("TRISECT_CACHE", str(trisect_cache))
    args = soak.parse_args(["--minutes", "1", "--warmup-s", "15", "--sample-every", "5", "--concurrency", "3",
                            "--serve-arg=--kv-cache-memory", "--serve-arg=64"])
    result, checks = soak.run(args)
    print(soak.report(result, checks))
    assert result["ok"] > 20 and len(result["samples"]) >= 5
    failed = {name: what for name, (ok, what) in checks.items() if not ok}
    assert not failed, failed
