"""ClusterConfig: what to serve and how the three stages are laid out — from YAML or CLI flags.

One object drives `services.app.build_app`; the same YAML is what a RayService's `serveConfigV2`
passes as application args on Kubernetes. Stage replicas either are fixed (`replicas`) or
autoscale (`min_replicas`..`max_replicas` on `target_ongoing_requests`), each on its own pool.
`limits` (a `Limits`) caps what one client request may cost; `bind_host` is where the listening
ports bind — loopback unless an operator opens it (docs/security.md).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import yaml

MODES = ("aggregated", "pd", "epd")
STAGES = ("ingress", "encode", "prefill", "decode", "aggregated")
POOL_OF = {"encode": "encode_pool", "prefill": "prefill_pool", "decode": "decode_pool",
           "aggregated": "prefill_pool", "ingress": None}


@dataclass(slots=True, frozen=True)
class Limits:
    """What one request may cost, each checked before the work it bounds (docs/security.md)."""
    max_request_bytes: int = 64 * 2**20   # HTTP body (before JSON parsing) and gRPC message
    max_json_depth: int = 32              # nesting of the HTTP JSON body
    max_prompt_bytes: int = 2**20         # UTF-8 bytes of all text of a request, before tokenizing
    max_images: int = 8                   # per request
    max_image_bytes: int = 10 * 2**20     # per encoded image
    max_image_pixels: int = 4096 * 4096   # per decoded image (width * height, from the header)
    max_image_aspect_ratio: int = 50      # long side / short side (resizing a strip explodes)
    max_tokens: int = 4096                # cap on a request's max_tokens
    max_in_flight: int = 256              # admitted, unfinished requests (backpressure)
    overload_retry_after_s: int = 1       # Retry-After told to a request refused past max_in_flight

    def __post_init__(self):
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{name} must be an integer >= 1, got {value!r}")


@dataclass(slots=True)
class StageConfig:
    replicas: int = 1
    min_replicas: int | None = None        # set both min and max to autoscale
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    num_cpus: float = 0.0                  # pools, not CPUs, decide placement
    num_gpus: float = 0.0
    threads: int | None = None             # torch threads inside the replica
    # how long a call to this stage may wait for Serve to give it a replica (none alive: Serve holds
    # it until a replacement is up) before the request fails UNAVAILABLE; scaling from zero
    # (min_replicas 0) needs more than a replica's start-up time
    unavailable_after_s: float = 10.0

    def __post_init__(self):
        if self.replicas < 0:
            raise ValueError("replicas must be >= 0")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas to autoscale, or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")
        if self.target_ongoing_requests <= 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("target_ongoing_requests must be > 0; num_cpus/num_gpus >= 0")
        if isinstance(self.unavailable_after_s, bool) or not isinstance(self.unavailable_after_s, (int, float)) \
                or not self.unavailable_after_s > 0:
            raise ValueError(f"unavailable_after_s must be a number of seconds > 0, got {self.unavailable_after_s!r}")

    @property
    def autoscaling(self) -> dict | None:
        if self.min_replicas is None:
            return None
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}


@dataclass(slots=True)
class ClusterConfig:
    model: str = "tiny-llava"
    mode: str = "epd"
    transfer: str = "objectstore"          # works across nodes; "shm" is faster when P and D share one
    # plasma store of the Ray head `trisect serve` starts (None: Ray's default, 30% of RAM); bounded,
    # so that prefaulting it (below) costs little memory and start-up time
    object_store_memory_mib: int | None = 2048
    # prefill/decode replicas map the whole store in at start-up: without it every ray.put of KV
    # page-faults on each 4 KiB it writes (~9 ms of a 16 MiB put)
    prefault_object_store: bool = True
    cache_dir: str | None = None
    block_size: int = 16
    kv_cache_memory_mib: int = 256
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_encoders_per_request: int = 2
    encoder_cache_mib: int = 256
    # an encode result bigger than this goes E→P through the object store, not through the ingress
    embed_inline_limit_kib: int = 1024
    redis_url: str | None = None
    rate_limit_per_s: float | None = None  # per API key, token bucket (needs Redis); None: unlimited
    rate_limit_burst: int = 20
    api_keys: list[str] = field(default_factory=list)
    grpc_port: int | None = 50051          # served by the ingress replica (None: HTTP only)
    bind_host: str = "127.0.0.1"           # gRPC and HTTP listen here; "0.0.0.0" only on purpose
    limits: Limits = field(default_factory=Limits)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    # prefill and decode replicas in one deployment on `llm_pool`, their role data in Redis, switched
    # live (docs/roles.md). None: on in pd/epd when the cluster has Redis; False: separate deployments
    role_switching: bool | None = None
    role_controller: bool = True           # the SLO controller (off: switches only by `trisect roles set`)
    role_policy: dict = field(default_factory=dict)   # cluster.role_policy.SwitchPolicy overrides

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {STAGES}")
        self.stages = {name: s if isinstance(s, StageConfig) else StageConfig(**s) for name, s in self.stages.items()}
        if not isinstance(self.limits, Limits):
            unknown = set(self.limits) - set(Limits.__slots__)
            if unknown:
                raise ValueError(f"unknown limits {sorted(unknown)}; known: {Limits.__slots__}")
            self.limits = Limits(**self.limits)
        if not self.bind_host or not isinstance(self.bind_host, str):
            raise ValueError("bind_host must be a host name or IP address, e.g. 127.0.0.1")
        for name in self.stage_names():
            self.stages.setdefault(name, StageConfig())
        if self.embed_inline_limit_kib < 0:
            raise ValueError("embed_inline_limit_kib must be >= 0 (0: always through the object store)")
        if self.object_store_memory_mib is not None and self.object_store_memory_mib < 64:
            raise ValueError("object_store_memory_mib must be >= 64 (or None for Ray's default)")
        if self.role_switching and self.mode == "aggregated":
            raise ValueError("role_switching needs mode pd or epd (aggregated has no roles to switch)")
        from cluster.role_policy import SwitchPolicy
        SwitchPolicy(**self.role_policy)   # bad keys or values fail here, at load time
        if self.redis_url:  # ${VAR} from the environment: a password stays in a Secret (helm chart)
            self.redis_url = os.path.expandvars(self.redis_url)

    @property
    def switching(self) -> bool:
        """Role switching in effect (role_switching, or its default for this mode and Redis)."""
        if self.role_switching is not None:
            return self.role_switching
        return self.mode != "aggregated" and bool(self.redis_url)

    def stage_names(self) -> tuple[str, ...]:
        return {"aggregated": ("ingress", "aggregated"), "pd": ("ingress", "prefill", "decode"),
                "epd": ("ingress", "encode", "prefill", "decode")}[self.mode]

    def engine(self) -> dict:
        return {"block_size": self.block_size, "kv_cache_memory": self.kv_cache_memory_mib * 2**20,
                "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens}

    def ray_head_options(self) -> dict:
        """ray.init() arguments for a head started here (not for joining an existing cluster, whose
        own `ray start --object-store-memory` rules)."""
        if self.object_store_memory_mib is None:
            return {}
        return {"object_store_memory": self.object_store_memory_mib * 2**20}

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> "ClusterConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def to_dict(self) -> dict:
        return asdict(self)
