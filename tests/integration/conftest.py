"""Integration fixtures: a real redis-server (never a mock), one per test session.

Each test gets its own key namespace on the shared server, so tests cannot see each other's keys
and no FLUSHALL is needed. Tests that crash Redis on purpose start their own server instead.
"""
import uuid

import pytest

from cluster.redis_server import RedisServer
from cluster.redis_store import RedisStore, StoreConfig


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def make_store(redis_server):
    """make_store(**StoreConfig overrides) -> RedisStore on the session server, in this test's namespace."""
    namespace = "t" + uuid.uuid4().hex[:12]
    stores = []

    def make(**overrides):
        cfg = StoreConfig(url=overrides.pop("url", redis_server.url), namespace=namespace, **overrides)
        stores.append(RedisStore(cfg))
        return stores[-1]

    yield make
    if stores and stores[0].ping():
        stores[0].clear()
    for s in stores:
        s.close()


@pytest.fixture
def store(make_store):
    return make_store()
