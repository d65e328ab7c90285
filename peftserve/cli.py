"""The ``peftserve`` command line.

``peftserve serve`` takes one flag per field of the config dataclasses (STYLE item 2): the
flag is the field name with dashes, its help is the field's docstring, list fields are
repeatable flags, and every flag has a ``PEFTSERVE_<FIELD>`` environment variable (lists
comma-separated). A flag beats its environment variable, which beats the field's default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from peftserve import __version__
from peftserve.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)

CONFIG_CLASSES: tuple[type, ...] = (
    ModelConfig,
    LoRAConfig,
    CacheConfig,
    SchedulerConfig,
    ServerConfig,
)
ENV_PREFIX = "PEFTSERVE_"
EXIT_USAGE = 2
EXIT_STARTUP = 1
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class FlagSpec:
    """One config field as a command-line flag and an environment variable."""

    owner: type
    field: str
    kind: type
    """Scalar type (int, float, str, bool); for list fields, the element type."""
    is_list: bool
    help: str

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


def flag_specs(classes: Sequence[type] = CONFIG_CLASSES) -> list[FlagSpec]:
    """Every field of ``classes`` as a FlagSpec; field names must be unique across them."""
    specs: dict[str, FlagSpec] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in specs:
                raise ValueError(f"config field {f.name!r} is defined twice; flags must be unique")
            kind, is_list = _flag_type(hints[f.name])
            specs[f.name] = FlagSpec(cls, f.name, kind, is_list, docs.get(f.name, ""))
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


def _default_of(spec: FlagSpec) -> Any:
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


def _converter(spec: FlagSpec) -> Callable[[str], Any]:
    return _parse_bool if spec.kind is bool else spec.kind


def add_config_flags(parser: argparse.ArgumentParser, specs: Sequence[FlagSpec]) -> None:
    """One flag per spec, grouped by config class; unset flags stay out of the namespace."""
    groups: dict[type, Any] = {}
    for spec in specs:
        if spec.owner not in groups:
            groups[spec.owner] = parser.add_argument_group(spec.owner.__name__)
        default = _default_of(spec)
        shown = ",".join(map(str, default)) if spec.is_list else default
        help_text = f"{spec.help} (default: {shown!s}; env {spec.env})".replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": spec.field,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if spec.kind is bool and not spec.is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _converter(spec)
            kwargs["metavar"] = spec.field.upper()
            if spec.is_list:
                kwargs["action"] = "append"
        groups[spec.owner].add_argument(spec.flag, **kwargs)


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
    convert = _converter(spec)
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
    engine: EngineConfig
    server: ServerConfig
    explicit: frozenset[str]
    """Fields set by a flag or an environment variable (the rest took their default)."""


def serve_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Configs for ``serve`` from parsed flags and the environment; raises ValueError."""
    specs = flag_specs()
    values = config_values(args, specs, os.environ if environ is None else environ)
    configs = build_configs(values, specs)
    engine = EngineConfig(
        model=configs[ModelConfig],
        lora=configs[LoRAConfig],
        cache=configs[CacheConfig],
        scheduler=configs[SchedulerConfig],
    )
    return ServeSettings(engine, configs[ServerConfig], frozenset(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftserve", description="Serve one base LLM with many LoRA adapters."
    )
    parser.add_argument("--version", action="version", version=f"peftserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Run the OpenAI-compatible server. Every flag also reads PEFTSERVE_<FIELD> (e.g. PEFTSERVE_MAX_LORA_RANK); a flag beats its variable.",
    )
    add_config_flags(serve, flag_specs())
    serve.set_defaults(handler=_run_serve)
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    from peftserve.serving import StartupError, run_server

    try:
        settings = serve_settings(args)
    except ValueError as e:
        return _fail(f"peftserve serve: error: {e}", EXIT_USAGE)
    try:
        run_server(settings)
    except StartupError as e:
        return _fail(f"peftserve serve: error: {e}", EXIT_STARTUP)
    return 0


def _fail(message: str, code: int) -> int:
    sys.stderr.write(" ".join(message.split()) + "\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
