"""Parse and validate standard PEFT LoRA adapters (adapter_config.json + safetensors).

An adapter is either applied exactly or refused with the reason: nothing is dropped
or half-applied (STYLE item 11). adapter_config.json is validated as a typed schema
(``peftserve.lora.adapter_config``). The weights file is the ground truth: every tensor in
it must be a ``lora_A``/``lora_B`` pair on a supported projection of the base model,
with matching shapes, a rank within the limit and finite values.

Range rule: the slot pool stores A and the scaled B (``B * scaling``) in the serving dtype
(the base projection's dtype), so every entry of both must be finite in that dtype
(float16 overflows past 65504, bfloat16 and float32 past ~3.4e38), and so must the LoRA
delta of any input row of unit L2 norm: ``||A||_F`` and ``||A||_F * ||B * scaling||_F``
(bounds of ``|x·Aᵀ|`` and ``|x·Aᵀ·Bᵀ|`` for ``||x||_2 <= 1``) must not pass the dtype's
largest finite value. This is one path for every way an adapter arrives: ``--adapter`` at
start-up, uploads, and loads from the registry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from peftserve.lora.adapter_config import (
    CONFIG_NAME,
    AdapterConfig,
    AdapterError,
    parse_config,
    show,
)

TARGET_NAMES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
)  # fmt: skip
"""Projections the engine can carry LoRA on (embeddings and lm_head are not among them).
Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``: its adapters target
those fused modules, one LoRA pair each, like any other projection."""

WEIGHTS_NAME = "adapter_model.safetensors"

# adapter_config keys that carry no behaviour the engine must reproduce.
_INERT_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "lora_dropout", "target_modules", "exclude_modules",
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "layers_pattern", "init_lora_weights", "megatron_core", "fan_in_fan_out",
    "ensure_weight_tying",
}  # fmt: skip
# Keys whose non-default value changes the function the adapter computes: refused by name.
_REFUSED_KEYS = {
    "use_dora": "DoRA (use_dora) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "lora_bias is not supported",
    "loftq_config": "LoftQ initialisation is not supported: it changes the base weights",
    "trainable_token_indices": "trainable_token_indices (embedding deltas) is not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "use_qalora": "QALoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "megatron_config": "megatron_config is not supported",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAAdapter:
    """A validated adapter: per target module, A [r, in] and B [out, r] with scaling folded in."""

    name: str
    path: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module name (as in the base model) -> (A [r, in] fp32, scaled B [out, r] fp32)."""
    config: dict = field(default_factory=dict)
    """adapter_config.json as read."""
    alpha: float = 8.0
    """``lora_alpha`` (validated: a finite number)."""

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.weights})


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every LoRA-capable projection of the model: name -> (in_features, out_features)."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGET_NAMES:
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, nn.Linear):
            shapes[name] = (base.in_features, base.out_features)
    return shapes


def load_adapter(path: str | Path, model: nn.Module, max_rank: int, name: str = "") -> LoRAAdapter:
    """Read, validate and prepare a PEFT adapter for ``model``; raise AdapterError if unusable."""
    path = Path(path)
    raw, schema = _read_config(path)
    config = _lora_config(schema)
    tensors = _read_weights(path)
    shapes = target_shapes(model)
    dtypes = _serving_dtypes(model)
    pairs = _pair_tensors(tensors, shapes)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (a, b) in sorted(pairs.items()):
        _check_pair(module, a, b, shapes[module], max_rank, config)
        scale = _scaling(config, module, a.shape[0])
        a64, b64 = a.double(), b.double() * scale  # [r, in], [out, r]
        _check_range(module, a64, b64, scale, dtypes[module])
        weights[module] = (a.float().contiguous(), b64.float().contiguous())
    if not weights:
        raise AdapterError(f"adapter at {path} holds no LoRA weights")
    return LoRAAdapter(
        name=name or path.name, path=str(path), weights=weights, config=raw, alpha=schema.lora_alpha
    )


def _lone_surrogate_field(raw: dict[str, object]) -> str | None:
    """The field (key or value) holding a lone surrogate, shown in ASCII; json.loads lets
    ``"\\ud800"`` through, and such a string cannot be stored, compared or answered as text."""
    for key, value in raw.items():
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return key.encode("ascii", "backslashreplace").decode()
    return None


def _read_config(path: Path) -> tuple[dict, AdapterConfig]:
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterError(f"{path} has no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_file.read_bytes())
    except RecursionError:
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    field = _lone_surrogate_field(raw)
    if field is not None:
        raise AdapterError(f"{CONFIG_NAME}: {field} holds a lone UTF-16 surrogate (such as \\ud800), "
                           "which is not Unicode text", field)  # fmt: skip
    if raw.get("peft_type", "LORA") != "LORA":
        peft_type = show(raw.get("peft_type"))
        raise AdapterError(f"peft_type {peft_type} is not supported; only LORA adapters are")
    schema = parse_config(raw)
    _refuse_options(raw, schema)
    return raw, schema


def _refuse_options(raw: dict, schema: AdapterConfig) -> None:
    for key, reason in _REFUSED_KEYS.items():
        if raw.get(key):
            raise AdapterError(reason)
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"bias={raw['bias']!r} is not supported; only bias='none' adapters are")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r} is not supported: PiSSA/OLoRA/LoftQ/CorDA adapters "
            "are only exact on a modified base model"
        )
    for bad in ("embed_tokens", "lm_head", "wte", "embed_out"):
        if any(t == bad or t.endswith("." + bad) for t in schema.targets):
            raise AdapterError(f"target module {bad!r} is not supported (embedding and lm_head targets)")
    for key, value in raw.items():
        if key in _INERT_KEYS or key in _REFUSED_KEYS or key == "bias" or not value:
            continue
        if not _is_inert_extra(key, value):
            raise AdapterError(f"adapter option {key}={show(value)} is not supported", key)


def _is_inert_extra(key: str, value: object) -> bool:
    """Options PEFT writes with harmless non-empty defaults (dicts of defaults, runtime hints)."""
    return key in {"runtime_config", "qalora_group_size", "layers_pattern", "eva_config", "corda_config"} or (
        isinstance(value, dict) and not any(value.values())
    )


def _lora_config(schema: AdapterConfig) -> LoraConfig:
    """PEFT's own config from the fields that decide targets and scaling (PEFT matches with it)."""
    fields = ("r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
              "layers_to_transform", "layers_pattern")  # fmt: skip
    kwargs = {name: getattr(schema, name) for name in fields}
    kwargs["rank_pattern"] = schema.rank_pattern or {}
    kwargs["alpha_pattern"] = schema.alpha_pattern or {}
    if kwargs["target_modules"] == "all-linear":
        kwargs["target_modules"] = list(TARGET_NAMES)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"invalid {CONFIG_NAME}: {exc}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise AdapterError(
                "pickle weights (.bin/.pt) are refused: they can run code on load; "
                "save the adapter with safetensors (save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {WEIGHTS_NAME}: {exc}") from None


def _pair_tensors(
    tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterError(f"weight {key!r} is not a LoRA A/B matrix; only plain LoRA is supported")
        module = match["module"]
        if module not in shapes:
            leaf = module.rsplit(".", 1)[-1]
            if leaf in ("embed_tokens", "lm_head"):
                raise AdapterError(f"target module {leaf!r} is not supported (embedding and lm_head targets)")
            have = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in shapes}))
            raise AdapterError(
                f"weight {key!r} targets {module!r}, which is not a supported projection of this base "
                f"model (its projections: {have}); was the adapter made for another model?"
            )
        halves.setdefault(module, {})[match["ab"]] = tensor
    pairs = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"module {module!r} has lora_{''.join(ab)} but not its pair")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def _check_pair(
    module: str,
    a: torch.Tensor,
    b: torch.Tensor,
    shape: tuple[int, int],
    max_rank: int,
    config: LoraConfig,
) -> None:
    in_features, out_features = shape
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(f"{module}: LoRA weights must be 2-D")
    rank = a.shape[0]
    if a.shape[1] != in_features or b.shape != (out_features, rank):
        raise AdapterError(
            f"{module}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not match the base model "
            f"(expected A[r, {in_features}] and B[{out_features}, r]); was it made for another base model?"
        )
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"{module}: rank {rank} is above max_lora_rank {max_rank}")
    if not a.is_floating_point() or not b.is_floating_point():
        raise AdapterError(f"{module}: LoRA weights must be floating point, got {a.dtype}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"{module}: weights contain NaN or Inf")
    if not check_target_module_exists(config, module):
        raise AdapterError(f"{module}: has weights but is not a target of adapter_config.json")
    expected = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    if expected != rank:
        raise AdapterError(
            f"{module}: weights have rank {rank} but {CONFIG_NAME} says {show(expected)}"
        )


def _scaling(config: LoraConfig, module: str, rank: int) -> float:
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _serving_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Every LoRA-capable projection's weight dtype: the dtype its slot pool stores A and B in."""
    dtypes: dict[str, torch.dtype] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if name.rsplit(".", 1)[-1] in TARGET_NAMES and isinstance(base, nn.Linear):
            dtypes[name] = base.weight.dtype if base.weight.is_floating_point() else torch.float32
    return dtypes


def _check_range(
    module: str, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
) -> None:
    """Refuse A [r, in] and scaled B [out, r] (float64) unless the rule of range holds in ``dtype``.

    The rule (module docstring): every entry finite in ``dtype``; ``||A||_F`` and
    ``||A||_F * ||B * scaling||_F`` (the largest ``|x·Aᵀ|`` and ``|x·Aᵀ·Bᵀ|`` for a row
    ``||x||_2 <= 1``) at most the largest finite value of ``dtype``.
    """
    limit = torch.finfo(dtype).max
    name = str(dtype).removeprefix("torch.")
    for label, tensor in (("lora_A", a), (f"lora_B * scaling ({scale:.4g})", b)):
        if not torch.isfinite(tensor.to(dtype)).all():
            raise AdapterError(
                f"{module}: {label} has entries as large as {tensor.abs().max().item():.3g}, which "
                f"overflow the serving dtype {name} (largest finite value {limit:.4g})"
            )
    norm_a = torch.linalg.vector_norm(a).item()
    bound = norm_a * torch.linalg.vector_norm(b).item()
    if max(norm_a, bound) > limit:
        raise AdapterError(
            f"{module}: the LoRA delta can overflow the serving dtype {name}: for an input row x of "
            f"unit L2 norm, |x·Aᵀ| may reach ||A||_F = {norm_a:.3g} and |x·Aᵀ·Bᵀ| may reach "
            f"||A||_F * ||B * scaling||_F = {bound:.3g}; both must be at most {limit:.4g}, the "
            f"largest finite {name} value"
        )
