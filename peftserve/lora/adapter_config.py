"""The typed schema of adapter_config.json: every field of PEFT's ``LoraConfig`` peftserve reads.

PEFT's ``LoraConfig`` (peft 0.21) is the reference for the types. Values come from
``json.loads`` and are checked strictly, without coercion: ``"8"`` is not a rank, ``true`` is
not a number, ``NaN``/``Infinity`` are not an alpha. A field of the wrong type is refused with
an ``AdapterError`` that names it and shows the value. Strings PEFT uses as regular
expressions (a string ``target_modules`` or ``exclude_modules``, the keys of ``rank_pattern``
and ``alpha_pattern``, ``layers_pattern``) must compile the way PEFT compiles them.

Fields outside the schema are kept as they are (``AdapterConfig.model_extra``);
``peftserve.lora.peft_adapter`` refuses those whose non-default value changes what the
adapter computes.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_NAME = "adapter_config.json"

PositiveInt = Annotated[int, Field(strict=True, ge=1)]
LayerIndex = Annotated[int, Field(strict=True, ge=0)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A finite JSON number (an int is accepted, as PEFT writes ``lora_alpha: 16``); not a bool."""


class AdapterError(ValueError):
    """The adapter cannot be applied exactly; the message says why.

    ``field`` names the adapter_config.json field at fault, when one is.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AdapterConfig(BaseModel):
    """adapter_config.json, validated. Each field's description is what its value must be."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    peft_type: str = Field("LORA", description="a string")
    r: PositiveInt = Field(8, description="a positive integer")
    lora_alpha: Number = Field(8, description="a finite number")
    use_rslora: bool = Field(False, description="true or false")
    target_modules: str | list[str] = Field(
        description="a list of module names or a regular expression string (a saved PEFT "
        "adapter always lists them)"
    )
    exclude_modules: str | list[str] | None = Field(
        None, description="null, a list of module names or a regular expression string"
    )
    rank_pattern: dict[str, PositiveInt] | None = Field(
        None, description="an object mapping module-name patterns to positive integer ranks"
    )
    alpha_pattern: dict[str, Number] | None = Field(
        None, description="an object mapping module-name patterns to finite numbers"
    )
    layers_to_transform: LayerIndex | list[LayerIndex] | None = Field(
        None, description="null, a layer index or a list of layer indices (integers >= 0)"
    )
    layers_pattern: str | list[str] | None = Field(
        None, description="null, a string or a list of strings"
    )
    bias: str = Field("none", description="a string")
    init_lora_weights: bool | str = Field(True, description="true, false or a method name")
    fan_in_fan_out: bool = Field(False, description="true or false")
    lora_dropout: Number = Field(0.0, description="a finite number")
    inference_mode: bool = Field(False, description="true or false")
    task_type: str | None = Field(None, description="null or a string")
    base_model_name_or_path: str | None = Field(None, description="null or a string")
    revision: str | None = Field(None, description="null or a string")
    peft_version: str | None = Field(None, description="null or a string")
    megatron_core: str | None = Field(None, description="null or a string")
    modules_to_save: list[str] | None = Field(None, description="null or a list of strings")
    use_dora: bool = Field(False, description="true or false")
    use_qalora: bool = Field(False, description="true or false")
    lora_bias: bool = Field(False, description="true or false")
    ensure_weight_tying: bool = Field(False, description="true or false")

    @property
    def targets(self) -> list[str]:
        """``target_modules`` as a list (a regular expression string is one item)."""
        targets = self.target_modules
        return [targets] if isinstance(targets, str) else targets


def parse_config(raw: dict[str, Any]) -> AdapterConfig:
    """Validate the JSON object of adapter_config.json; AdapterError names the first bad field."""
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as exc:
        raise _field_error(exc, raw) from None
    _check_patterns(config)
    return config


def show(value: object, limit: int = 60) -> str:
    """``value`` as JSON, cut to ``limit`` characters (for error messages)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_error(exc: ValidationError, raw: dict[str, Any]) -> AdapterError:
    first = exc.errors()[0]
    if not first["loc"] or first["loc"][0] not in AdapterConfig.model_fields:
        return AdapterError(f"{CONFIG_NAME}: {first['msg']}")
    field = str(first["loc"][0])
    expected = AdapterConfig.model_fields[field].description
    if first["type"] == "missing":
        return AdapterError(f"{CONFIG_NAME} has no {field}: it must be {expected}", field)
    return AdapterError(f"{CONFIG_NAME}: {field} must be {expected}, not {show(raw[field])}", field)


def _check_patterns(config: AdapterConfig) -> None:
    """Compile every regular expression the way PEFT's matching compiles it."""
    patterns: list[tuple[str, str, str]] = []  # (field, pattern as written, what PEFT compiles)
    for field in ("target_modules", "exclude_modules"):
        value = getattr(config, field)
        if isinstance(value, str):
            patterns.append((field, value, value))
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field) or {}:
            patterns.append((field, key, rf"(.*\.)?({key})$"))
    layers = config.layers_pattern
    for pattern in [layers] if isinstance(layers, str) else layers or []:
        patterns.append(("layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."))
    for field, written, compiled in patterns:
        try:
            re.compile(compiled)
        except (re.error, RecursionError, OverflowError) as exc:
            reason = exc.msg if isinstance(exc, re.error) else type(exc).__name__
            raise AdapterError(
                f"{CONFIG_NAME}: {field} holds {show(written)}, which is not a valid regular "
                f"expression ({reason})",
                field,
            ) from None
