"""build_app(config) → a Ray Serve application: a pure function of ClusterConfig.

Usable as a RayService `import_path` (`services.app:app_builder`, args = the config dict). Each
stage becomes one deployment placed on its pool by a custom resource (`encode_pool`,
`prefill_pool`, `decode_pool`) with its own fixed replica count or autoscaling policy and a bounded
queue (`queue_bound`: past it, RESOURCE_EXHAUSTED / 429 with a retry-after); the ingress
deployment holds the stages' handles, runs the orchestrator, serves OpenAI-compatible HTTP through
Serve's proxy and gRPC on `grpc_port` from inside the replica. With role switching (the default
in pd/epd with Redis) prefill and decode are one `LLMPool` deployment on `llm_pool` whose replicas
switch role live, and every ingress runs the role controller (one acts, under a Redis lease).
"""
from __future__ import annotations

from ray import serve
from ray.serve.config import BackpressureConfig

from cluster.config import POOL_OF, ClusterConfig, Limits, StageConfig
from cluster.request_router import pinned_router_config
from services.deployments import EncodeServer, LLMServer

_MAX_ONGOING = {"ingress": 1024, "encode": 64, "prefill": 128, "decode": 256, "aggregated": 256}


def queue_bound(name: str, limits: Limits) -> int:
    """Serve's `max_queued_requests`: requests a caller may hold waiting for a replica of this
    deployment (all its replicas at max_ongoing_requests). A stage's caller is an ingress replica,
    which admits at most `max_in_flight` requests, each with one call to a stage at a time: the
    bound is that, so it bites only on a bug or an image-sharding fan-out, and never silently grows.
    The ingress's caller is Serve's HTTP proxy: it may queue one replica's worth more."""
    return _MAX_ONGOING["ingress"] if name == "ingress" else limits.max_in_flight


def stage_options(name: str, stage: StageConfig, limits: Limits | None = None) -> dict:
    pool = POOL_OF[name]
    limits = limits or Limits()
    opts = {"name": name.capitalize() + ("Server" if name != "ingress" else ""),
            "ray_actor_options": {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus,
                                  "resources": {pool: 1} if pool else {}},
            "max_ongoing_requests": _MAX_ONGOING[name],
            # bounded queues: past the bound the proxy answers 429 + Retry-After, a handle raises
            # BackPressureError (-> RESOURCE_EXHAUSTED with retry-after, services/cluster_backend.py)
            "max_queued_requests": queue_bound(name, limits),
            "backpressure_config": BackpressureConfig(status_code=429,
                                                      retry_after_s=limits.overload_retry_after_s)}
    if name != "ingress":               # honours the Redis router's choice of replica
        opts["request_router_config"] = pinned_router_config()
    if stage.autoscaling:
        opts["autoscaling_config"] = stage.autoscaling
    else:
        opts["num_replicas"] = stage.replicas
    return opts


@serve.ingress()
class Ingress:
    async def __init__(self, config: dict, aggregated=None, encode=None, prefill=None, decode=None):
        from decoders.model import load_model
        from services.api_metrics import ApiMetrics
        from services.auth import ApiKeys
        from services.cluster_backend import ClusterBackend
        from services.orchestrator import Orchestrator, StageClient, Stages

        cfg = ClusterConfig.from_dict(config)
        handles = {"aggregated": aggregated, "encode": encode, "prefill": prefill, "decode": decode}
        stages = Stages(**{k: StageClient(h, is_handle=True, name=k,
                                          unavailable_after_s=cfg.stages[k].unavailable_after_s)
                           for k, h in handles.items() if h is not None})
        frontend = load_model(cfg.model, cache_dir=cfg.cache_dir, frontend_only=True)
        router = None
        if cfg.redis_url:
            from services.routing import RedisRouting
            router = RedisRouting(cfg.redis_url, cfg.mode, cfg.block_size, frontend.image_token_id,
                                  cfg.max_encoders_per_request)
        orchestrator = Orchestrator(cfg.mode, stages, cfg.max_encoders_per_request, router=router)
        limiter = journal = None
        if cfg.redis_url:
            from cluster.redis_store import RedisStore
            from services.ingress_redis import Journal, RateLimiter
            store = RedisStore(cfg.redis_url)
            journal = Journal(store)
            if cfg.rate_limit_per_s:
                limiter = RateLimiter(store, cfg.rate_limit_per_s, cfg.rate_limit_burst)
        self.backend = ClusterBackend(frontend, orchestrator, cfg.model, cfg.limits, rate_limiter=limiter, journal=journal)
        self.auth = ApiKeys(cfg.api_keys) if cfg.api_keys else ApiKeys.from_env()
        self.metrics = ApiMetrics(self.backend)
        from services import request_log, stage_loads, stage_metrics
        from services.deployments import _replica_id
        request_log.setup()
        llm = {k: getattr(stages, k) for k in ("aggregated", "prefill", "decode") if getattr(stages, k)}
        self.backend.loads = stage_loads.StageLoads(llm).start()
        self.sampler = stage_metrics.watch_ingress(self.backend, _replica_id())
        self.roles = None
        if cfg.switching and cfg.role_controller and cfg.redis_url:
            from cluster.redis_store import RedisStore
            from cluster.role_policy import SwitchPolicy
            from cluster.role_switcher import RoleSwitcher
            self.roles = RoleSwitcher(RedisStore(cfg.redis_url), _replica_id(), SwitchPolicy(**cfg.role_policy),
                                      latency_fn=self.metrics.recent_latency).start()   # this ingress's p90s
        self.grpc = None
        if cfg.grpc_port is not None:
            from services.grpc_ingress import start_grpc_server
            self.grpc = await start_grpc_server(self.backend, f"{cfg.bind_host}:{cfg.grpc_port}", self.auth, self.metrics)

    def __serve_build_asgi_app__(self):
        from services.http_ingress import build_http_app
        return build_http_app(self.backend, self.auth, self.metrics)


def llm_pool(config: ClusterConfig) -> serve.Application:
    """Role switching: prefill and decode replicas as one deployment on `llm_pool`, first split from
    the stages' replica counts (services/switchable.py); prefill's stage sets the actor options."""
    from services.switchable import SwitchableLLMServer
    if not config.redis_url:
        raise ValueError("role_switching needs redis_url: roles live in the Redis registry")
    pre, dec = config.stages["prefill"], config.stages["decode"]
    opts = stage_options("prefill", pre, config.limits)
    opts.update(name="LLMPool", max_ongoing_requests=_MAX_ONGOING["decode"])
    opts["ray_actor_options"]["resources"] = {"llm_pool": 1}
    opts.pop("autoscaling_config", None)
    opts.pop("num_replicas", None)
    if pre.autoscaling or dec.autoscaling:
        # Serve scales the pool; a new replica takes the role furthest below the split, and at
        # least one replica per role stays (min 2)
        lo = sum(s.min_replicas if s.autoscaling else s.replicas for s in (pre, dec))
        hi = sum(s.max_replicas if s.autoscaling else s.replicas for s in (pre, dec))
        target = (dec if dec.autoscaling else pre).target_ongoing_requests
        opts["autoscaling_config"] = {"min_replicas": max(2, lo), "max_replicas": max(2, hi),
                                      "target_ongoing_requests": target}
    else:
        opts["num_replicas"] = pre.replicas + dec.replicas
    d = serve.deployment(SwitchableLLMServer).options(**opts)
    return d.bind(config.model, {"prefill": pre.replicas, "decode": dec.replicas}, config.engine(), config.transfer,
                  pre.threads, config.cache_dir, config.redis_url, config.prefault_object_store)


def build_app(config: ClusterConfig) -> serve.Application:
    engine = config.engine()
    common = {"cache_dir": config.cache_dir, "redis_url": config.redis_url}
    bound = {}
    if config.switching:
        bound["prefill"] = bound["decode"] = llm_pool(config)
    for name in config.stage_names():
        if name in bound:
            continue
        stage = config.stages[name]
        if name == "encode":
            d = serve.deployment(EncodeServer).options(**stage_options(name, stage, config.limits))
            bound[name] = d.bind(config.model, config.encoder_cache_mib * 2**20, stage.threads, **common,
                                 inline_limit_bytes=config.embed_inline_limit_kib * 2**10)
        elif name in ("prefill", "decode", "aggregated"):
            d = serve.deployment(LLMServer).options(**stage_options(name, stage, config.limits))
            bound[name] = d.bind(config.model, name, engine, config.transfer, stage.threads, **common,
                                 prefault_object_store=config.prefault_object_store)
    ingress = serve.deployment(Ingress).options(**stage_options("ingress", config.stages["ingress"], config.limits))
    return ingress.bind(config.to_dict(), **bound)


def app_builder(args: dict) -> serve.Application:
    """RayService / `serve run` entry point: `services.app:app_builder` with the config as args."""
    return build_app(ClusterConfig.from_dict(dict(args)))
