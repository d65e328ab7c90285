"""LoRA parsing, refusals and the MultiLoRALinear math against PEFT's own forward."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peftserve.config import LoRAConfig
from peftserve.lora.manager import LoRAManager
from peftserve.lora.peft_adapter import AdapterError, load_adapter
from tests.tiny_models import make_peft_adapter, make_tiny_model

ADAPTER_SPECS = {
    "r1": dict(r=1, target_modules=["q_proj"], lora_alpha=2),
    "r64": dict(r=64, target_modules="all-linear", lora_alpha=16, use_rslora=True),
    "r8": dict(r=8, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"], lora_alpha=8,
               rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 3}),
    "r3": dict(r=3, target_modules=["v_proj", "up_proj"], lora_alpha=5, layers_to_transform=[1]),
    "rx": dict(r=2, target_modules=r".*\.layers\.0\.(self_attn\.v_proj|mlp\.up_proj)", lora_alpha=4),
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama")


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_peft_adapter(model_dir, root / name, seed=i + 1, **spec)
        for i, (name, spec) in enumerate(ADAPTER_SPECS.items())
    }


def _peft_logits(model_dir: Path, adapter_dir: Path | None, ids: torch.Tensor) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_multi_lora_forward_matches_peft(model_dir, adapters):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    manager = LoRAManager(model, LoRAConfig(max_lora_rank=64, max_loras=5), 256, 16, "cpu", torch.float32)
    slots = {name: manager.load(name, load_adapter(path, model, 64)) for name, path in adapters.items()}
    names = [None, "r1", "r64", "r8", None, "r3", "rx", "r64"]  # base rows interleaved, one adapter twice
    order = sorted(range(len(names)), key=lambda i: slots.get(names[i], 0))  # grouped by slot
    torch.manual_seed(0)
    ids = torch.randint(4, 40, (len(names), 9))[order]
    manager.prepare([slots.get(names[i], 0) for i in order for _ in range(ids.shape[1])])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    for row, i in enumerate(order):
        want = _peft_logits(model_dir, adapters[names[i]] if names[i] else None, ids[row : row + 1])[0]
        rel = (got[row] - want).norm() / want.norm()
        assert rel < 1e-5, (names[i], rel.item())
    # The adapters really change the output (the test could not pass with LoRA ignored).
    base = _peft_logits(model_dir, None, ids[-1:])[0]
    assert (got[-1] - base).abs().max() > 1e-2


def test_unload_clears_slot_and_reuses_it(model_dir, adapters):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    manager = LoRAManager(model, LoRAConfig(max_lora_rank=64, max_loras=2), 64, 4, "cpu", torch.float32)
    s1 = manager.load("a", load_adapter(adapters["r64"], model, 64))
    manager.load("b", load_adapter(adapters["r1"], model, 64))
    with pytest.raises(RuntimeError, match="slots are in use"):
        manager.load("c", load_adapter(adapters["r8"], model, 64))
    manager.unload("a")
    assert all(layer.lora_a[s1].abs().sum() == 0 and layer.ranks[s1] == 0 for layer in manager.layers.values())
    assert manager.load("c", load_adapter(adapters["r8"], model, 64)) == s1


# ---- refusals: each bad adapter is refused with its reason ---------------------------------


def _edit_config(path: Path, **changes) -> None:
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


def _edit_weights(path: Path, fn) -> None:
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


@pytest.fixture
def fresh_adapter(model_dir, tmp_path) -> Path:
    return make_peft_adapter(model_dir, tmp_path / "ad", r=4, target_modules=["q_proj", "v_proj"])


def _refused(path: Path, model_dir: Path, match: str, max_rank: int = 64) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(AdapterError, match=match):
        load_adapter(path, model, max_rank)


def _nan(t):
    k = next(k for k in t if "lora_B" in k)
    t[k][0, 0] = float("nan")


def _inf(t):
    k = next(k for k in t if "lora_A" in k)
    t[k][0, 0] = float("inf")


def _drop_b(t):
    del t[next(k for k in t if "lora_B" in k)]


def _extra_key(t):
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"] = torch.ones(64)


def _embed(t):
    t["base_model.model.model.embed_tokens.lora_A.weight"] = torch.ones(4, 64)
    t["base_model.model.model.embed_tokens.lora_B.weight"] = torch.ones(64, 4)


def _wrong_shape(t):
    k = next(k for k in t if "lora_A" in k)
    t[k] = torch.ones(4, 65)


@pytest.mark.parametrize(
    "config_change, match",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(bias="all"), "bias='all'"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
        (dict(target_modules=["embed_tokens"]), "embed_tokens"),
        (dict(init_lora_weights="pissa"), "PiSSA"),
        (dict(init_lora_weights="pissa_niter_4"), "PiSSA"),
        (dict(init_lora_weights="olora"), "OLoRA"),
        (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "LoftQ"),
        (dict(peft_type="IA3"), "IA3"),
        (dict(use_bdlora={"x": 1}), "use_bdlora"),
        (dict(r=8), "rank 4 but adapter_config.json says 8"),
        (dict(target_modules=["q_proj"]), "not a target"),
    ],
)
def test_refuses_unsupported_config(fresh_adapter, model_dir, config_change, match):
    _edit_config(fresh_adapter, **config_change)
    _refused(fresh_adapter, model_dir, match)


@pytest.mark.parametrize(
    "edit, match",
    [
        (_nan, "NaN or Inf"),
        (_inf, "NaN or Inf"),
        (_drop_b, "not its pair"),
        (_extra_key, "not a LoRA A/B matrix"),
        (_embed, "embed_tokens"),
        (_wrong_shape, "do not match the base model"),
    ],
)
def test_refuses_bad_weights(fresh_adapter, model_dir, edit, match):
    _edit_weights(fresh_adapter, edit)
    _refused(fresh_adapter, model_dir, match)


def test_refuses_pickle_weights(fresh_adapter, model_dir):
    weights = load_file(str(fresh_adapter / "adapter_model.safetensors"))
    (fresh_adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, fresh_adapter / "adapter_model.bin")
    _refused(fresh_adapter, model_dir, r"pickle weights \(.bin/.pt\) are refused")


def test_refuses_rank_above_limit(fresh_adapter, model_dir):
    _refused(fresh_adapter, model_dir, "rank 4 is above max_lora_rank 2", max_rank=2)


def test_refuses_other_base_model(fresh_adapter, tmp_path):
    other = make_tiny_model(tmp_path / "other", "llama", hidden_size=32, intermediate_size=64)
    _refused(fresh_adapter, other, "another base model")


def test_refuses_missing_files(tmp_path, model_dir, fresh_adapter):
    _refused(tmp_path / "nope", model_dir, "does not exist")
    (fresh_adapter / "adapter_config.json").write_text("{not json")
    _refused(fresh_adapter, model_dir, "not valid JSON")


def test_refused_adapter_leaves_slots_untouched(model_dir, fresh_adapter):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    manager = LoRAManager(model, LoRAConfig(max_lora_rank=8, max_loras=2), 16, 4, "cpu", torch.float32)
    _edit_weights(fresh_adapter, _nan)
    with pytest.raises(AdapterError):
        manager.load("x", load_adapter(fresh_adapter, model, 8))
    assert manager.num_free_slots == 2 and not manager.loaded
    assert all(layer.lora_a.abs().sum() == 0 for layer in manager.layers.values())


NORMS = re.escape("||A||_F * ||B * scaling||_F")
OVERFLOW_FP16 = r"lora_A has entries as large as .* overflow the serving dtype float16"


def _times(factor: float):
    def scale(t):
        for k in t:
            t[k] = t[k] * factor

    return scale


@pytest.mark.parametrize(
    "factor, refused_in",
    [
        (300.0, {torch.float16: NORMS}),  # entries fit float16 (<= ~250), the norms do not
        (1e6, {torch.float16: OVERFLOW_FP16}),
        (1e20, {torch.float16: OVERFLOW_FP16, torch.bfloat16: NORMS, torch.float32: NORMS}),
    ],
)
def test_range_rule_is_checked_in_the_serving_dtype(fresh_adapter, model_dir, factor, refused_in):
    """A and the scaled B must fit the dtype the slot pool stores them in, and so must the
    delta of a unit-norm input row: the same weights pass in float32 and fail in float16."""
    _edit_weights(fresh_adapter, _times(factor))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model.to(dtype)
        if dtype in refused_in:
            with pytest.raises(AdapterError, match=refused_in[dtype]):
                load_adapter(fresh_adapter, model, 64)
        else:
            weights = load_adapter(fresh_adapter, model, 64).weights.values()
            assert all(torch.isfinite(b.to(dtype)).all() for _, b in weights)
