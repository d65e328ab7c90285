"""Configuration objects, one per concern.

Every field has a docstring (the string literal under it) and is validated in
``__post_init__`` with a ``ValueError`` a user can act on. The CLI
(``peftserve.cli``) maps each field one-to-one onto a ``--flag`` and a
``PEFTSERVE_<FIELD>`` environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "adapters" / "base"
DEFAULT_ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "adapters"


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "peftserve")


@dataclass
class ModelConfig:
    model: str = str(DEFAULT_MODEL_DIR)
    """Local Hugging Face model directory (Llama, Mistral or Qwen2 family)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    dtype: str = "auto"
    """auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16."""
    seed: int = 0
    """Seed for requests that give none."""
    attention_backend: str = "auto"
    """Paged attention: auto (triton on cuda, torch elsewhere), torch or triton."""
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs captured at batch-size buckets (cuda only, with the triton attention and LoRA backends; ignored on cpu)."""

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, not {self.attention_backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")


@dataclass
class LoRAConfig:
    max_lora_rank: int = 64
    """Largest adapter rank accepted; adapters above it are refused at load."""
    max_loras: int = 16
    """Adapter slots resident on the device (the GPU tier; slot 0, 'no adapter', comes on top)."""
    max_cpu_adapters: int = 64
    """Prepared adapters kept in host memory (the CPU tier, LRU; pinned on cuda), on top of the resident ones."""
    lora_backend: str = "auto"
    """LoRA kernels: auto (triton on cuda, torch elsewhere), torch or triton."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_lora_rank <= 512:
            raise ValueError(f"max_lora_rank must be in 1..512, not {self.max_lora_rank}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, not {self.max_loras}")
        if self.max_cpu_adapters < 1:
            raise ValueError(f"max_cpu_adapters must be at least 1, not {self.max_cpu_adapters}")
        if self.lora_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"lora_backend must be auto, torch or triton, not {self.lora_backend!r}")


@dataclass
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory_gb: float = 0.0
    """Memory budget for the paged KV cache in GiB; 0 picks a default (1 GiB on cpu, 90% of free on cuda)."""
    max_model_len: int = 0
    """Longest prompt plus completion in tokens; 0 takes the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, not {self.block_size}")
        if self.kv_cache_memory_gb < 0:
            raise ValueError("kv_cache_memory_gb must be >= 0")
        if self.max_model_len < 0:
            raise ValueError("max_model_len must be >= 0")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    """Most sequences running in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks and decode tokens together)."""
    max_waiting: int = 1024
    """Bound of the waiting queue; a full queue answers 429."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on."""
    adapter: list[str] = field(default_factory=list)
    """Adapters to serve, as NAME=PATH (repeatable). With none given and the default model, the bundled demo adapters."""
    served_model_name: str = ""
    """Name of the base model in the API; defaults to the model directory's name."""
    api_key: list[str] = field(default_factory=list)
    """API keys accepted on inference routes (repeatable); none means open."""
    admin_token: str = ""
    """Bearer token for /admin routes; empty means admin answers on loopback only."""
    data_dir: str = field(default_factory=_default_data_dir)
    """Where the adapter registry and rollout state live."""
    max_adapter_bytes: int = 512 * 1024 * 1024
    """Largest adapter upload accepted by the admin API, in bytes (counted as it streams); larger ones get 413."""
    max_request_bytes: int = 0
    """Largest JSON request body of /v1 routes, in bytes (counted as it arrives); larger ones get 413. 0 sizes it from the context: 64 bytes per token of max_model_len, plus 1 MiB."""
    log_level: str = "info"
    """debug, info, warning or error."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        for spec in self.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"adapter must be NAME=PATH, not {spec!r}")
        if self.max_adapter_bytes < 1:
            raise ValueError(f"max_adapter_bytes must be at least 1, not {self.max_adapter_bytes}")
        if self.max_request_bytes < 0:
            raise ValueError(
                f"max_request_bytes must be >= 0 (0 sizes it from max_model_len), not {self.max_request_bytes}"
            )
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, not {self.log_level!r}")


@dataclass
class CanaryConfig:
    canary_interval_s: float = 10.0
    """Seconds between two rounds of the rollout controller (probe, judge, decide)."""
    promote_keep_warm_s: float = 600.0
    """After a promotion, the previous stable version stays loaded this long (for an instant rollback)."""
    rollback_keep_warm_s: float = 60.0
    """After a rollback, the candidate stays loaded this long (for requests in flight), then is unloaded."""
    probes_per_tick: int = 5
    """Eval-set prompts sent to both versions of a rollout per controller round (0: no probes; eval sets are refused)."""
    probe_max_tokens: int = 64
    """Most tokens of one probe completion (greedy)."""
    feedback_ttl_s: float = 3600.0
    """How long a completion id accepts feedback (POST /v1/feedback)."""
    shadow_max_inflight: int = 4
    """Most shadow copies running at once; a copy beyond it is skipped (shadows never queue up)."""

    def __post_init__(self) -> None:
        if not self.canary_interval_s > 0:
            raise ValueError(f"canary_interval_s must be > 0, not {self.canary_interval_s}")
        for name in ("promote_keep_warm_s", "rollback_keep_warm_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.probes_per_tick < 0:
            raise ValueError(f"probes_per_tick must be >= 0, not {self.probes_per_tick}")
        if self.probe_max_tokens < 1:
            raise ValueError(f"probe_max_tokens must be at least 1, not {self.probe_max_tokens}")
        if not self.feedback_ttl_s > 0:
            raise ValueError(f"feedback_ttl_s must be > 0, not {self.feedback_ttl_s}")
        if self.shadow_max_inflight < 0:
            raise ValueError(f"shadow_max_inflight must be >= 0 (0 turns shadow copies off), not {self.shadow_max_inflight}")


@dataclass
class RayConfig:
    ray: bool = False
    """Serve as Ray Serve deployments: ingress replicas, engine replicas and one rollout controller (needs peftserve[ray])."""
    ray_address: str = ""
    """Ray cluster to join (an address such as 10.0.0.5:6379, or auto); empty starts a local Ray on this machine."""
    engine_replicas: int = 1
    """Engine replicas (one per GPU); each holds the base model and serves the tasks routed to it."""
    ingress_replicas: int = 1
    """Ingress replicas (CPU): OpenAI routes, auth and the canary router; admin calls go on to the controller."""
    engine_num_cpus: float = 1.0
    """CPUs Ray reserves for each engine replica."""
    engine_num_gpus: float = -1.0
    """GPUs Ray reserves for each engine replica; -1: one when the cluster has GPUs, else none."""
    engine_max_ongoing_requests: int = 64
    """Requests one engine replica takes at once; beyond it Ray Serve sends a task's requests to another replica (which loads the task)."""
    max_tasks_per_replica: int = 16
    """Tasks an engine replica keeps registered (Ray Serve model multiplexing, least recently used first out)."""
    snapshot_interval_s: float = 1.0
    """How often ingress and engine replicas refresh the rollout snapshot and push their samples and stats."""
    adapter_cache_dir: str = ""
    """Node-local cache of adapter files fetched by sha256 on engine replicas; empty: peftserve-adapters under the temp dir."""

    def __post_init__(self) -> None:
        for name in ("engine_replicas", "ingress_replicas", "engine_max_ongoing_requests", "max_tasks_per_replica"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.engine_num_cpus < 0:
            raise ValueError(f"engine_num_cpus must be >= 0, not {self.engine_num_cpus}")
        if self.engine_num_gpus < 0 and self.engine_num_gpus != -1:
            raise ValueError(f"engine_num_gpus must be >= 0 or -1 (auto), not {self.engine_num_gpus}")
        if not self.snapshot_interval_s > 0:
            raise ValueError(f"snapshot_interval_s must be > 0, not {self.snapshot_interval_s}")


@dataclass
class EngineConfig:
    """Everything the engine needs, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
