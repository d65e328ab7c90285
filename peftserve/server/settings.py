"""The settings of ``peftserve serve``: one flag per field of the config dataclasses (STYLE item 2).

A field's flag is its name with dashes, its help is the field's docstring, list fields are
repeatable flags, and every field has a ``PEFTSERVE_<FIELD>`` environment variable (lists
comma-separated). A flag beats its environment variable, which beats the field's default.
The argparse side lives in ``peftserve.cli``; this module turns values into ``ServeSettings``.

``ALIASES`` adds vLLM's names for the same settings (``--max-cpu-loras``, ``--lora-modules``;
``--max-loras`` and ``--max-lora-rank`` are our names already), so a vLLM command line runs
unchanged. An alias sets the same field as our flag (a field given by both takes the last one
on the command line); environment variables exist for our names only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from peftserve.config import (
    CacheConfig,
    CanaryConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    RayConfig,
    SchedulerConfig,
    ServerConfig,
)

CONFIG_CLASSES: tuple[type, ...] = (
    ModelConfig,
    LoRAConfig,
    CacheConfig,
    SchedulerConfig,
    ServerConfig,
    CanaryConfig,
    RayConfig,
)
ENV_PREFIX = "PEFTSERVE_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class FlagAlias:
    """Another project's flag for one of our fields (its values go through ``parse``)."""

    flag: str
    field: str
    origin: str
    """Whose name it is (shown in the help)."""
    parse: Callable[[str], Any] | None = None
    """Turns one command-line value into the field's value (default: the field's type)."""
    many: bool = False
    """Takes several values after one flag (``--lora-modules a=/x b=/y``) and may repeat."""
    help: str = ""
    """What differs from our flag, if anything."""
    metavar: str = ""


def lora_module(text: str) -> str:
    """vLLM's ``--lora-modules`` value, ``name=path`` or ``{"name": ..., "path": ...}``, as our
    ``NAME=PATH``."""
    raw = text.strip()
    if not raw.startswith("{"):
        name, sep, path = raw.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"expected name=path or a JSON object, not {text!r}")
        return raw
    try:
        module = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(module, dict) or not all(
        isinstance(module.get(k), str) and module[k] for k in ("name", "path")
    ):
        raise ValueError(f'expected {{"name": NAME, "path": PATH}}, not {text!r}')
    unknown = sorted(set(module) - {"name", "path", "base_model_name"})
    if unknown:
        raise ValueError(f"unsupported key(s) {', '.join(unknown)} in {text!r}")
    return f"{module['name']}={module['path']}"


ALIASES: tuple[FlagAlias, ...] = (
    FlagAlias("--max-cpu-loras", "max_cpu_adapters", "vLLM",
              help="vLLM counts the resident adapters in it; here they come on top"),
    FlagAlias("--lora-modules", "adapter", "vLLM", lora_module, many=True, metavar="NAME=PATH",
              help='NAME=PATH or {"name": NAME, "path": PATH}, several after one flag'),
)  # fmt: skip
"""vLLM's flag names for our fields (``--max-loras`` and ``--max-lora-rank`` are ours too)."""


@dataclass(frozen=True)
class FlagSpec:
    """One config field as a command-line flag and an environment variable."""

    owner: type
    field: str
    kind: type
    """Scalar type (int, float, str, bool); for list fields, the element type."""
    is_list: bool
    help: str
    aliases: tuple[FlagAlias, ...] = ()
    """Other projects' flags for this field (``ALIASES``)."""

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if _is_field(stmt) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def _is_field(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)


def flag_specs(
    classes: Sequence[type] = CONFIG_CLASSES, aliases: Sequence[FlagAlias] = ALIASES
) -> list[FlagSpec]:
    """Every field of ``classes`` as a FlagSpec (with its ``aliases``); field names must be
    unique across them, and an alias may not be the flag of a field."""
    specs: dict[str, FlagSpec] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in specs:
                raise ValueError(f"config field {f.name!r} is defined twice; flags must be unique")
            kind, is_list = _flag_type(hints[f.name])
            own = tuple(a for a in aliases if a.field == f.name)
            specs[f.name] = FlagSpec(cls, f.name, kind, is_list, docs.get(f.name, ""), own)
    flags = {spec.flag for spec in specs.values()}
    for alias in aliases:
        if alias.flag in flags:
            raise ValueError(f"alias {alias.flag} is already the flag of a config field")
    return list(specs.values())


def _flag_type(tp: Any) -> tuple[type, bool]:
    """int -> (int, False); list[str] -> (str, True); int | None -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return _flag_type(args[0])
    return tp, False


def default_of(spec: FlagSpec) -> Any:
    f = next(f for f in dataclasses.fields(spec.owner) if f.name == spec.field)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def converter(spec: FlagSpec) -> Callable[[str], Any]:
    return _parse_bool if spec.kind is bool else spec.kind


def config_values(
    args: argparse.Namespace, specs: Sequence[FlagSpec], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Field -> value for every field set by flag or environment; defaults are left out."""
    values: dict[str, Any] = {}
    for spec in specs:
        if hasattr(args, spec.field):
            values[spec.field] = getattr(args, spec.field)
        elif spec.env in environ:
            values[spec.field] = _from_env(spec, environ[spec.env])
    return values


def _from_env(spec: FlagSpec, raw: str) -> Any:
    convert = converter(spec)
    try:
        if spec.is_list:
            return [convert(item.strip()) for item in raw.split(",") if item.strip()]
        return convert(raw.strip())
    except ValueError as e:
        raise ValueError(f"{spec.env}={raw!r}: {e}") from None


def build_configs(values: Mapping[str, Any], specs: Sequence[FlagSpec]) -> dict[type, Any]:
    """Instantiate each config class from ``values`` (its ``__post_init__`` may raise ValueError)."""
    configs = {}
    for cls in dict.fromkeys(spec.owner for spec in specs):
        names = {s.field for s in specs if s.owner is cls}
        configs[cls] = cls(**{k: v for k, v in values.items() if k in names})
    return configs


@dataclass
class ServeSettings:
    """Everything ``peftserve serve`` runs with: the engine's configs, the server's, the canary's."""

    engine: EngineConfig
    server: ServerConfig
    explicit: frozenset[str]
    """Fields set by a flag or an environment variable (the rest took their default)."""
    canary: CanaryConfig = dataclasses.field(default_factory=CanaryConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    """How ``serve --ray`` lays the roles out on a Ray cluster."""


def settings_from_values(
    values: Mapping[str, Any], specs: Sequence[FlagSpec] | None = None
) -> ServeSettings:
    """``ServeSettings`` from field values (those left out take their defaults); raises ValueError."""
    specs = flag_specs() if specs is None else specs
    configs = build_configs(values, specs)
    engine = EngineConfig(
        model=configs[ModelConfig],
        lora=configs[LoRAConfig],
        cache=configs[CacheConfig],
        scheduler=configs[SchedulerConfig],
    )
    return ServeSettings(
        engine, configs[ServerConfig], frozenset(values), configs[CanaryConfig], configs[RayConfig]
    )
