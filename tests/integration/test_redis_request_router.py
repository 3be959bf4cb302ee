"""PinnedReplicaRouter on a real local Ray Serve: pinned requests land on the pinned replica,
and an unknown/gone pin falls back to the default power-of-two choice."""
import shutil
import tempfile

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from cluster.request_router import current_replica_id, pinned, pinned_router_config  # noqa: E402


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8,
                  request_router_config=pinned_router_config())
class WhoAmI:
    def whoami(self, pinned_replica: str | None = None) -> str:
        return current_replica_id()


@pytest.fixture(scope="module")
def app():
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        yield serve.run(WhoAmI.bind(), name="pin", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _ids(app, n=24, **kw):
    return [r.result(timeout_s=30) for r in [app.whoami.remote(**kw) for _ in range(n)]]


@pytest.mark.slow
def test_pinned_requests_land_on_pinned_replica_and_fall_back(app):
    seen = set(_ids(app, 40))                    # unpinned: power-of-two spreads over both
    assert len(seen) == 2, seen
    for rid in seen:
        assert set(_ids(app, pinned_replica=rid)) == {rid}              # pin via kwargs
        h = pinned(app, rid)                                             # pin via request metadata
        assert {h.whoami.remote().result(timeout_s=30) for _ in range(24)} == {rid}
    fallback = _ids(app, 40, pinned_replica="gone-replica")            # unknown pin: no hang
    assert set(fallback) <= seen and len(set(fallback)) == 2
