import pytest


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray for this module: its own temp dir, shut down afterwards."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
