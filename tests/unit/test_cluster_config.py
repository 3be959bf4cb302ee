"""ClusterConfig → Serve deployment options: pools, replicas, autoscaling, pinned routing."""
import pytest

from cluster.config import ClusterConfig, StageConfig
from services.app import build_app, stage_options


def test_stage_options_place_each_stage_on_its_pool_and_autoscale():
    fixed = stage_options("decode", StageConfig(replicas=3, num_gpus=1))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.0, "num_gpus": 1, "resources": {"decode_pool": 1}}
    assert "PinnedReplicaRouter" in str(fixed["request_router_config"].request_router_class)
    auto = stage_options("encode", StageConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=6))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 6}
    assert "num_replicas" not in auto and auto["ray_actor_options"]["resources"] == {"encode_pool": 1}
    ingress = stage_options("ingress", StageConfig())
    assert ingress["ray_actor_options"]["resources"] == {} and "request_router_config" not in ingress


@pytest.mark.parametrize("mode,stages", [("aggregated", {"ingress", "aggregated"}),
                                        ("pd", {"ingress", "prefill", "decode"}),
                                        ("epd", {"ingress", "encode", "prefill", "decode"})])
def test_build_app_deploys_exactly_the_mode_stages(mode, stages):
    cfg = ClusterConfig(mode=mode, stages={"decode": {"min_replicas": 2, "max_replicas": 4}} if mode != "aggregated"
                        else {})
    ingress = build_app(cfg)._bound_deployment
    assert ingress.name == "Ingress" and set(ingress.init_kwargs) == stages - {"ingress"}
    for stage, bound in ingress.init_kwargs.items():
        d = bound._bound_deployment
        assert d.ray_actor_options["resources"] == {"aggregated": {"prefill_pool": 1}, "encode": {"encode_pool": 1},
                                                    "prefill": {"prefill_pool": 1},
                                                    "decode": {"decode_pool": 1}}[stage]
        if stage == "decode":
            assert d._deployment_config.autoscaling_config.max_replicas == 4


def test_every_deployment_has_a_bounded_queue_refused_with_429_and_retry_after():
    cfg = ClusterConfig(mode="epd", role_switching=False, limits={"max_in_flight": 40, "overload_retry_after_s": 3})
    ingress = build_app(cfg)._bound_deployment
    deployments = {"ingress": ingress} | {k: b._bound_deployment for k, b in ingress.init_kwargs.items()}
    assert set(deployments) == {"ingress", "encode", "prefill", "decode"}
    for stage, d in deployments.items():
        c = d._deployment_config
        # a stage's caller (an ingress) never has more than max_in_flight requests to queue
        assert c.max_queued_requests == (1024 if stage == "ingress" else 40), stage
        assert c.backpressure_config.status_code == 429 and c.backpressure_config.retry_after_s == 3


def test_config_validation_and_yaml_round_trip(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        ClusterConfig(mode="nope")
    with pytest.raises(ValueError, match="unknown stages"):
        ClusterConfig(stages={"encoder": {}})
    with pytest.raises(ValueError, match="min_replicas"):
        StageConfig(min_replicas=2)
    with pytest.raises(ValueError, match="unknown config keys"):
        ClusterConfig.from_dict({"modle": "x"})
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-qwen2-vl\nmode: pd\nstages:\n  decode: {replicas: 3}\n")
    cfg = ClusterConfig.from_yaml(str(path))
    assert cfg.model == "tiny-qwen2-vl" and cfg.stages["decode"].replicas == 3
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg


def test_object_store_options_for_a_local_head():
    assert ClusterConfig().ray_head_options() == {"object_store_memory": 2048 * 2**20}
    assert ClusterConfig().prefault_object_store is True
    assert ClusterConfig(object_store_memory_mib=None).ray_head_options() == {}   # Ray's own default
    with pytest.raises(ValueError, match="object_store_memory_mib"):
        ClusterConfig(object_store_memory_mib=8)


def test_embed_inline_limit_must_not_be_negative():
    assert ClusterConfig(embed_inline_limit_kib=0).embed_inline_limit_kib == 0   # 0: always via the store
    with pytest.raises(ValueError, match="embed_inline_limit_kib"):
        ClusterConfig(embed_inline_limit_kib=-1)


def test_unavailable_after_s_has_a_default_a_key_and_a_precise_error():
    assert StageConfig().unavailable_after_s == 10.0
    cfg = ClusterConfig.from_dict({"mode": "epd", "stages": {"encode": {"unavailable_after_s": 3}}})
    assert cfg.stages["encode"].unavailable_after_s == 3 and cfg.stages["prefill"].unavailable_after_s == 10.0
    for bad in (0, -1, "10", True, None):
        with pytest.raises(ValueError, match="unavailable_after_s must be a number of seconds > 0"):
            StageConfig(unavailable_after_s=bad)


def test_a_stage_without_a_replica_is_unavailable_with_its_own_message():
    from services.cluster_backend import client_error
    from services.errors import ErrorCode
    from services.orchestrator import StageUnavailable
    e = client_error(StageUnavailable("no encode replica could take the request within 10.0 s"), "r1")
    assert e.code is ErrorCode.UNAVAILABLE and e.message.startswith("no encode replica")
