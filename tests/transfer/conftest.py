import pytest


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray for this module: its own temp dir, shut down afterwards."""
    import ray
    # a bounded store (as `trisect serve` starts one), so prefaulting it stays cheap
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             object_store_memory=256 * 2**20,
             logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
