"""The later model families (Qwen3, Gemma 3 text, Phi-3, Llama 3 rope) through the whole engine.

Each family's tiny model switches on the features that set it apart (tests/tiny_models.py);
``test_family_features_matter`` checks that each of those features changes the model's
output, so the equivalence tests below would catch an engine that ignored one of them.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from peftserve.lora.peft_adapter import AdapterError, load_adapter
from tests.engine_helpers import (
    generate_all,
    greedy,
    hf_greedy,
    hf_last_logits,
    load_hf,
    make_engine,
    random_prompts,
    rel_err,
    run_to_completion,
)
from tests.tiny_models import MORE_FAMILIES, make_peft_adapter, make_tiny_model

ADAPTERS = {
    "r1": dict(r=1, target_modules=["q_proj"], lora_alpha=2),
    "r64": dict(r=64, target_modules="all-linear", lora_alpha=16, use_rslora=True),
    "r8": dict(r=8, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"], lora_alpha=8,
               rank_pattern={"down_proj": 4}),
    "r3": dict(r=3, target_modules=["v_proj", "up_proj"], lora_alpha=5, layers_to_transform=[1]),
}  # fmt: skip
REQUESTS = [None, "r1", "r64", "r8", "r3", "r64", None, "r8"]
LENGTHS = (6, 11, 3, 17, 25, 9, 1, 30)
PHI3_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}  # fmt: skip


def _spec(family: str, spec: dict) -> dict:
    """Phi-3 adapters target its fused modules: q/k/v -> qkv_proj, gate/up -> gate_up_proj."""
    if family != "phi3" or spec["target_modules"] == "all-linear":
        return spec
    fused = dict.fromkeys(PHI3_FUSED.get(n, n) for n in spec["target_modules"])
    out = {**spec, "target_modules": list(fused)}
    if "rank_pattern" in spec:
        out["rank_pattern"] = {PHI3_FUSED.get(k, k): v for k, v in spec["rank_pattern"].items()}
    return out


def _setup(root, family, names=tuple(ADAPTERS)):
    model_dir = make_tiny_model(root, family)
    adapters = {
        name: make_peft_adapter(
            model_dir, root / f"{family}-{name}", seed=i + 1, **_spec(family, ADAPTERS[name])
        )
        for i, name in enumerate(names)
    }
    return model_dir, adapters


def _check_mixed_step(
    tmp_path, family, backend, requests, lengths, new_tokens, adapter_names, **engine_kwargs
):
    """One packed step of mixed adapters (base included) against PEFT, then greedy decoding."""
    model_dir, adapters = _setup(tmp_path, family, adapter_names)
    engine = make_engine(model_dir, max_loras=len(adapters), lora_backend=backend, **engine_kwargs)
    assert engine.lora_manager.backend.name == backend
    for name, path in adapters.items():
        engine.add_lora(name, load_adapter(path, engine.model, 64))
    prompts = random_prompts(lengths, seed=13)
    for i, (prompt, name) in enumerate(zip(prompts, requests, strict=True)):
        engine.add_request(str(i), prompt, greedy(new_tokens), lora_id=name)
    first, logits = engine.step_with_logits()
    assert len(logits) == len(prompts) and engine.stats.mixed_lora_steps == 1
    assert engine.stats.max_loras_in_step == len(adapters)
    results = run_to_completion(engine)
    for out in first:
        results[out.request_id].token_ids[:0] = out.token_ids
    base = load_hf(model_dir)
    for name in [None, *adapters]:
        model = (
            PeftModel.from_pretrained(load_hf(model_dir), adapters[name]).eval() if name else base
        )
        for i in (i for i, n in enumerate(requests) if n == name):
            case = (family, name, i)
            want = hf_last_logits(model, prompts[i])
            assert rel_err(logits[str(i)], want) < 1e-4, case
            if name is not None:  # the adapter matters: the test would fail without it
                assert rel_err(hf_last_logits(base, prompts[i]), want) > 1e-3, case
            assert results[str(i)].token_ids == hf_greedy(model, prompts[i], new_tokens), case


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_mixed_adapters_match_peft_torch(tmp_path, family):
    _check_mixed_step(tmp_path, family, "torch", REQUESTS, LENGTHS, 10, tuple(ADAPTERS))


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_mixed_adapters_match_peft_triton(tmp_path, monkeypatch, family):
    """The Triton LoRA backend, base and two adapters in one step, then one decode step.

    The interpreter runs every program of a launch in numpy, and the launch grid grows with the
    step's tokens and the segment buffer (``max_num_seqs``), so both are kept small; autotuning
    (timing each config, many launches) is off, as in tests/test_kernels.py."""
    monkeypatch.setenv("PEFTSERVE_TRITON_AUTOTUNE", "0")
    requests, lengths = [None, "r8", "r64", "r8"], (5, 3, 9, 4)
    _check_mixed_step(
        tmp_path, family, "triton", requests, lengths, 2, ("r8", "r64"), max_num_seqs=4
    )


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_windowed_chunked_prefill_matches_hf(tmp_path, family):
    """Prompts longer than the window, prefilled in chunks that attend to cached context."""
    model_dir = make_tiny_model(tmp_path, family)
    engine = make_engine(model_dir, max_num_batched_tokens=16, max_num_seqs=4)
    prompts = random_prompts((3, 9, 20, 37), seed=3)
    results = generate_all(engine, prompts, greedy(12))
    ref = load_hf(model_dir)
    for i, prompt in enumerate(prompts):
        assert results[str(i)].token_ids == hf_greedy(ref, prompt, 12), (family, len(prompt))


def test_gemma2_on_triton_attention_matches_hf(tmp_path):
    """Soft-capping, alternating windows and query_pre_attn_scalar through the Triton attention
    kernel (interpreted): chunked prefill with cached context, mixed and decode-only steps."""
    model_dir = make_tiny_model(tmp_path, "gemma2")
    engine = make_engine(
        model_dir, max_num_batched_tokens=24, max_num_seqs=4, attention_backend="triton"
    )
    assert engine.runner.model.config._attn_implementation == "peftserve_paged_triton"
    prompts = random_prompts((3, 20, 9, 33), seed=4)
    results = generate_all(engine, prompts, greedy(4))
    ref = load_hf(model_dir)
    for i, prompt in enumerate(prompts):
        assert results[str(i)].token_ids == hf_greedy(ref, prompt, 4), len(prompt)


def _last_logits(model_dir, prompt, mutate=None) -> torch.Tensor:
    model = load_hf(model_dir)
    if mutate is not None:
        mutate(model)
    return hf_last_logits(model, prompt)


def _no_qk_norm(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()


def _unscaled_embeddings(model) -> None:
    model.model.embed_tokens.embed_scale.fill_(1.0)


FEATURES = {
    "qk-norm": ("qwen3", {}, _no_qk_norm),
    "attn-softcap": ("gemma2", dict(attn_logit_softcapping=None), None),
    "final-softcap": ("gemma2", dict(final_logit_softcapping=None), None),
    "gemma2-sliding-layers": ("gemma2", dict(layer_types=["full_attention", "full_attention"]), None),
    "gemma2-query-scale": ("gemma2", dict(query_pre_attn_scalar=16), None),
    "embed-scale": ("gemma3_text", {}, _unscaled_embeddings),
    "gemma3-query-scale": ("gemma3_text", dict(query_pre_attn_scalar=16), None),
    "gemma3-sliding-layers": ("gemma3_text", dict(layer_types=["full_attention", "full_attention"]), None),
    "rope-per-layer-type": ("gemma3_text", dict(rope_parameters=None), None),
    "phi3-window": ("phi3", dict(sliding_window=None), None),
    "llama3-rope": ("llama3", dict(rope_parameters=dict(rope_type="default", rope_theta=500000.0)), None),
}  # fmt: skip


@pytest.mark.parametrize("feature", FEATURES)
def test_family_features_matter(tmp_path, feature):
    """Switching one feature of a tiny model off (same weights) changes its logits: the tiny
    configs exercise each feature the equivalence tests claim to cover."""
    family, overrides, mutate = FEATURES[feature]
    prompt = random_prompts((30,), seed=5)[0]
    want = _last_logits(make_tiny_model(tmp_path / "a", family), prompt)
    other = _last_logits(make_tiny_model(tmp_path / "b", family, **overrides), prompt, mutate)
    assert rel_err(other, want) > 1e-2


ROPES = {
    "linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)), 0),
    "dynamic": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0)), 0),
    "yarn": ("qwen3", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                original_max_position_embeddings=16)), 0),
    "longrope": ("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                   short_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0],
                                                   long_factor=[2.0] * 8),
                              original_max_position_embeddings=48), 48),
}  # fmt: skip


@pytest.mark.parametrize("rope", ROPES)
def test_rope_scalings_match_hf(tmp_path, rope):
    """Every accepted rope_type, prompts past its original context: one step's logits and greedy."""
    family, overrides, max_model_len = ROPES[rope]
    model_dir = make_tiny_model(tmp_path, family, **overrides)
    engine = make_engine(model_dir, max_model_len=max_model_len)
    prompts = random_prompts((3, 21, 40), seed=7)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy(6))
    first, logits = engine.step_with_logits()
    results = run_to_completion(engine)
    ref = load_hf(model_dir)
    for i, prompt in enumerate(prompts):
        assert rel_err(logits[str(i)], hf_last_logits(ref, prompt)) < 1e-4, (rope, i)
        tokens = (
            next(o.token_ids for o in first if o.request_id == str(i)) + results[str(i)].token_ids
        )
        assert tokens == hf_greedy(ref, prompt, 6), (rope, i)


def _with_config(tmp_path, family, **changes):
    """A tiny model of ``family`` whose config.json is then edited by ``changes``."""
    model_dir = make_tiny_model(tmp_path, family)
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return model_dir


REFUSALS = {
    "multimodal-gemma3": (
        dict(family="gemma3_text", model_type="gemma3"), {}, "multimodal Gemma 3 .*model_type 'gemma3_text'"),
    "unknown-rope": (
        dict(family="llama", rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0}), {},
        "rope_type 'proportional' is not supported; supported: default, linear, llama3, yarn, dynamic, longrope"),
    "rope-per-layer-type": (
        dict(family="gemma3_text", rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "rope_theta": 10000.0}}), {},
        r"rope_type 'proportional' \(full_attention layers\) is not supported"),
    "longrope-past-original": (
        dict(family="phi3", rope_parameters=ROPES["longrope"][1]["rope_parameters"],
             original_max_position_embeddings=48), dict(max_model_len=64),
        r"switches from its short to its long factors .* set max_model_len to at most 48 \(now 64\)"),
    "bidirectional": (
        dict(family="gemma3_text", use_bidirectional_attention=True), {}, "use_bidirectional_attention=True"),
    "chunked-layers": (
        dict(family="gemma3_text", layer_types=["chunked_attention", "full_attention"]), {},
        r"attention layer types \['chunked_attention'\] are not supported"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_unservable_models_are_refused_at_start(tmp_path, case):
    changes, engine_kwargs, message = REFUSALS[case]
    model_dir = _with_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as info:
        make_engine(model_dir, **engine_kwargs)
    assert "\n" not in str(info.value)


def test_phi3_adapter_for_unfused_projections_is_refused(tmp_path):
    """An adapter whose weights name q_proj/v_proj (made on a Llama of the same sizes) cannot
    apply to Phi-3, whose attention has only the fused qkv_proj: refused, naming what it has."""
    llama = make_tiny_model(tmp_path, "llama")
    adapter = make_peft_adapter(llama, tmp_path / "llama-lora", target_modules=["q_proj", "v_proj"])
    engine = make_engine(make_tiny_model(tmp_path, "phi3"))
    with pytest.raises(
        AdapterError,
        match=r"self_attn.q_proj'.*its projections: down_proj, gate_up_proj, o_proj, qkv_proj",
    ):
        load_adapter(adapter, engine.model, 64)
