"""The parts every composition of ``peftserve serve`` opens: the engine, the model table, the
adapter service on the registry, the canary runtime; and the checks they make first.

Every failure a user can cause (missing or unsupported model directory, bad adapter) is
raised as ``StartupError`` with a one-line message; the CLI prints it without a traceback.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from peftserve.config import DEFAULT_ADAPTERS_DIR, DEFAULT_MODEL_DIR

if TYPE_CHECKING:
    from peftserve.config import EngineConfig
    from peftserve.engine.engine import AsyncLLMEngine, LLMEngine
    from peftserve.server.adapters import AdapterService
    from peftserve.server.canary import CanaryRuntime
    from peftserve.server.model_table import ModelTable
    from peftserve.server.settings import ServeSettings

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
GRACEFUL_SHUTDOWN_S = 5
"""On Ctrl-C, how long open requests may finish before they are cut."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StartupError(Exception):
    """The server cannot start; the message (one line) says why."""


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    logging.getLogger().setLevel(level.upper())


def check_model_dir(path: str) -> None:
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise StartupError(f"model directory {path} does not exist (give one with --model)")
    if not (model_dir / "config.json").is_file():
        raise StartupError(f"{path} is not a Hugging Face model directory: it has no config.json")


def demo_adapters(adapters_dir: Path | None = None) -> dict[str, str]:
    """Every directory under ``adapters_dir`` (default: the bundled ``adapters/``) that holds
    an adapter_config.json, by directory name, except candidate versions: ``TASK-vN...``
    beside a ``TASK`` directory is a later version of TASK (``peftserve demo`` rolls it out)."""
    adapters_dir = DEFAULT_ADAPTERS_DIR if adapters_dir is None else adapters_dir
    if not adapters_dir.is_dir():
        return {}
    found = {p.parent.name: str(p.parent) for p in sorted(adapters_dir.glob(f"*/{ADAPTER_CONFIG}"))}
    return {name: path for name, path in found.items() if candidate_of(name, found) is None}


def candidate_of(name: str, names: Iterable[str]) -> tuple[str, str] | None:
    """``("reverse", "v2-regressed")`` for ``reverse-v2-regressed`` when ``reverse`` is in names."""
    task, sep, version = name.partition("-v")
    if sep and task in names and version[:1].isdigit():
        return task, "v" + version
    return None


def served_adapters(settings: ServeSettings) -> dict[str, str]:
    """NAME=PATH specs as a dict; with none given and the default model, the demo adapters."""
    server = settings.server
    if "adapter" not in settings.explicit and _is_default_model(settings.engine.model.model):
        return demo_adapters()
    adapters: dict[str, str] = {}
    for spec in server.adapter:
        name, _, path = spec.partition("=")
        if name in adapters:
            raise StartupError(f"adapter name {name!r} is given twice")
        adapters[name] = path
    return adapters


def _is_default_model(path: str) -> bool:
    return Path(path).resolve() == DEFAULT_MODEL_DIR.resolve()


def served_model_name(settings: ServeSettings) -> str:
    name = settings.server.served_model_name
    return name or Path(settings.engine.model.model).resolve().name


def load_engine(config: EngineConfig) -> LLMEngine:
    check_model_dir(config.model.model)
    from peftserve.engine.engine import LLMEngine

    logger.info("loading model %s", config.model.model)
    try:
        return LLMEngine(config)
    except Exception as e:  # any load failure becomes one line; the traceback stays at debug
        logger.debug("model load failed", exc_info=True)
        raise StartupError(f"cannot load model {config.model.model}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def model_table(settings: ServeSettings) -> ModelTable:
    from peftserve.server.model_table import ModelTable

    model_dir = Path(settings.engine.model.model).resolve()
    return ModelTable(
        base_name=served_model_name(settings), base_root=model_dir.name, max_model_len=0
    )


def startup_adapters(settings: ServeSettings) -> dict[str, str]:
    adapters = served_adapters(settings)
    for name, path in adapters.items():
        if not (Path(path) / ADAPTER_CONFIG).is_file():
            raise StartupError(f"adapter {name!r}: {path} has no {ADAPTER_CONFIG}")
    return adapters


def open_adapter_service(
    settings: ServeSettings, engine: AsyncLLMEngine, table: ModelTable
) -> AdapterService:
    """Open the registry and stable pointers under --data-dir for the engine's base model."""
    from peftserve.registry import Registry, base_fingerprint
    from peftserve.server.adapters import AdapterService
    from peftserve.server.stable import StablePointers

    data_dir = settings.server.data_dir
    llm = engine.engine
    try:
        registry = Registry(data_dir, base_fingerprint(llm.model_config))
    except (OSError, sqlite3.Error, RuntimeError) as e:
        raise StartupError(f"cannot open the data directory {data_dir}: {_one_line(e)}") from e
    try:
        stable = StablePointers(data_dir)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        registry.close()
        raise StartupError(f"cannot open the data directory {data_dir}: {_one_line(e)}") from e
    logger.info("adapter registry: %s", data_dir)
    return AdapterService(
        registry=registry,
        stable=stable,
        table=table,
        engine=engine,
        max_rank=settings.engine.lora.max_lora_rank,
        max_bytes=settings.server.max_adapter_bytes,
    )


def open_canary(
    settings: ServeSettings, engine: AsyncLLMEngine, service: AdapterService
) -> CanaryRuntime:
    """The rollout runtime on the registry's database; its rollouts are restored when the app starts."""
    from peftserve.server.canary import CanaryRuntime

    data_dir = settings.server.data_dir
    try:
        return CanaryRuntime(service, engine, settings.canary, data_dir)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        raise StartupError(f"cannot open the rollout store in {data_dir}: {_one_line(e)}") from e


def register_startup_adapters(service: AdapterService, adapters: dict[str, str]) -> None:
    """Register each --adapter NAME=PATH (or demo adapter) in the registry."""
    from peftserve.registry import RegistryError

    for name, path in adapters.items():
        try:
            record = service.register_startup(name, path)
        except RegistryError as e:
            raise StartupError(f"adapter {name!r} ({path}): {_one_line(e)}") from e
        logger.info(
            "adapter %s from %s is registered as %s (rank %d)", name, path, record.ref, record.rank
        )
