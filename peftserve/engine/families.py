"""The model families the engine serves exactly, and the start-up check of a model's config.

The engine runs a step as one packed sequence ``[1, T]`` through the unmodified Hugging Face
model, with the paged attention of ``peftserve.engine.attention`` as its attention function.
That is exact for a family when everything outside attention works token by token (norms,
MLPs, rotary embeddings from ``position_ids``) and when the paged attention implements every
attention feature the family passes it (scaling, sliding_window, softcap). ``check_model_config`` refuses, with the reason, a config that
would break either condition: an unknown family, a multimodal checkpoint, a rotary scaling
whose frequencies depend on the longest sequence in a forward pass (across a packed step
that mixes sequences), bidirectional or otherwise non-causal layers.
"""

from __future__ import annotations

from transformers import PretrainedConfig

FAMILIES: dict[str, str] = {
    "llama": "Llama 2, Llama 3 / 3.1 / 3.2 (rope_type llama3), and Llama-architecture models",
    "mistral": "Mistral (sliding window)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 dense (q/k norms)",
    "gemma2": (
        "Gemma 2: attention logit soft-capping, alternating sliding-window and global layers, "
        "scaled embeddings, query_pre_attn_scalar, final logit soft-capping"
    ),
    "gemma3_text": (
        "Gemma 3 text-only (gemma-3-1b, or a Gemma3ForCausalLM checkpoint): sliding-window and global "
        "layers with their own rope, scaled embeddings, query_pre_attn_scalar"
    ),
    "phi3": "Phi-3 / Phi-3.5 mini and medium (fused qkv_proj and gate_up_proj)",
}
"""model_type -> the models it covers (the README's list)."""

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

_OTHER_FAMILIES = {
    "gemma3": (
        "model_type 'gemma3' is the multimodal Gemma 3 (vision tower + language model); peftserve "
        "serves text-only Gemma 3 checkpoints (model_type 'gemma3_text', e.g. gemma-3-1b, or the "
        "language model saved on its own with Gemma3ForCausalLM)"
    ),
}
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""Rotary types whose frequencies are fixed at load: a pure function of each token's position."""
_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_model_type(model_type: str | None) -> None:
    """Raise ValueError unless ``model_type`` (config.json's) is a family the engine serves."""
    if model_type in _OTHER_FAMILIES:
        raise ValueError(_OTHER_FAMILIES[model_type])
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_model_config(config: PretrainedConfig, max_model_len: int) -> None:
    """Raise ValueError, naming the reason, unless the engine can serve this model exactly."""
    check_model_type(config.model_type)
    for where, params in _rope_parameter_sets(config):
        _check_rope(where, params, max_model_len)
    _check_attention(config)


def _rope_parameter_sets(config: PretrainedConfig) -> list[tuple[str, dict]]:
    """(where, rope parameters): one set, or one per layer type (Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params or not all(isinstance(v, dict) for v in params.values()):
        return [("", params)]
    return [(f" ({layer_type} layers)", p) for layer_type, p in params.items() if p]


def _check_rope(where: str, params: dict, max_model_len: int) -> None:
    rope_type = params.get("rope_type", "default")
    if rope_type in _STATIC_ROPE:
        return
    if rope_type == "dynamic":
        # Dynamic NTK rescales only past max_position_embeddings, which max_model_len never exceeds.
        return
    if rope_type == "longrope":
        original = params.get("original_max_position_embeddings")
        if original is not None and max_model_len <= original:
            return  # every step stays on the short factors, as Hugging Face does for such sequences
        raise ValueError(
            f"rope_type 'longrope'{where} switches from its short to its long factors when the longest "
            f"sequence of a forward pass passes original_max_position_embeddings ({original}); a packed "
            "step mixes sequences, so that switch cannot be reproduced per sequence: set max_model_len "
            f"to at most {original} (now {max_model_len})"
        )
    supported = ", ".join((*_STATIC_ROPE, "dynamic", "longrope"))
    raise ValueError(f"rope_type {rope_type!r}{where} is not supported; supported: {supported}")


def _check_attention(config: PretrainedConfig) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            "use_bidirectional_attention=True (an encoder-style, non-causal model) is not supported: "
            "the engine's attention is causal"
        )
    layer_types = getattr(config, "layer_types", None) or []
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"attention layer types {unknown} are not supported; supported: {', '.join(_LAYER_TYPES)}"
        )
    if "sliding_attention" in layer_types and not getattr(config, "sliding_window", None):
        raise ValueError("the config has sliding_attention layers but no sliding_window size")
