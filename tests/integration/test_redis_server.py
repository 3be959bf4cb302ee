"""The embedded redis-server and the store's URL handling, against real servers."""
import pytest

from cluster.redis_server import RedisServer, find_redis_server, ping
from cluster.redis_store import RedisStore, StoreConfig, StoreUnavailable, redact_url


def test_binary_found_and_server_lifecycle():
    assert find_redis_server()
    srv = RedisServer().start()
    port = srv.port
    assert ping("127.0.0.1", port)
    srv.kill()
    assert not ping("127.0.0.1", port)
    srv.start()                      # same port after a crash: the outage tests rely on it
    assert srv.port == port and ping("127.0.0.1", port)
    srv.stop()
    assert not srv.running and not ping("127.0.0.1", port)


def test_password_url_and_acl_user_url():
    acl = ["--user", "alice", "on", ">s3cret", "~*", "+@all"]
    with RedisServer(password="p@ss word", extra_args=acl) as srv:
        st = RedisStore(StoreConfig(url=srv.url, namespace="pw"))    # password, URL-quoted
        assert st.ping()
        user = RedisStore(StoreConfig(url=f"redis://alice:s3cret@127.0.0.1:{srv.port}/0", namespace="pw"))
        assert user.ping()
        assert user.rate_limit("k", 2, 1.0).allowed     # scripts run under the ACL user too
        wrong = RedisStore(StoreConfig(url=f"redis://alice:nope@127.0.0.1:{srv.port}/0", namespace="pw"))
        assert not wrong.ping()
        for s in (st, user, wrong):
            s.close()


def test_tls_url_accepted_and_passwords_redacted():
    st = RedisStore("rediss://bob:hunter2@redis.example:6380/1")   # connects lazily: nothing sent yet
    assert st.round_trips == 0
    assert redact_url(st.config.url) == "rediss://bob:***@redis.example:6380/1"
    with pytest.raises(ValueError):
        StoreConfig(url="http://x")


def test_unreachable_store_fails_fast_with_circuit():
    st = RedisStore(StoreConfig(url="redis://127.0.0.1:1/0", namespace="x", retries=0))
    with pytest.raises(StoreUnavailable):
        st.route_snapshot()
    assert not st.available
    with pytest.raises(StoreUnavailable, match="circuit open"):
        st.route_snapshot()
