"""The module-swap pass that groups q/k/v and gate/up: one GEMM and one LoRA launch set per
group, members return views, any call order works; fused projections stay single layers."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from peftserve.config import LoRAConfig
from peftserve.lora import manager as manager_mod
from peftserve.lora.layers import GroupedLoRALinear, MultiLoRALinear
from peftserve.lora.manager import LoRAManager
from peftserve.lora.peft_adapter import load_adapter
from tests.tiny_models import make_peft_adapter, make_tiny_model


def _manager(model: nn.Module, **kwargs) -> LoRAManager:
    return LoRAManager(
        model, LoRAConfig(max_lora_rank=16, max_loras=2, **kwargs), 64, 8, "cpu", torch.float32
    )


def test_siblings_share_one_weight_and_the_output_is_unchanged(tmp_path):
    model_dir = make_tiny_model(tmp_path, "qwen2")  # q/k/v with biases
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    manager = _manager(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    assert all(isinstance(m, GroupedLoRALinear) for m in (q, k, v, mlp.gate_proj, mlp.up_proj))
    assert q.group is k.group is v.group and mlp.gate_proj.group is mlp.up_proj.group
    assert isinstance(attn.o_proj, MultiLoRALinear) and isinstance(mlp.down_proj, MultiLoRALinear)
    group = q.group
    assert q.base_layer.weight.data_ptr() == group.weight.data_ptr()  # a view: no second copy
    assert (
        v.base_layer.bias.data_ptr()
        == group.bias.data_ptr() + (q.out_features + k.out_features) * 4
    )
    assert len(manager.stacks) == 2 * 4  # per layer: qkv, o, gate_up, down
    ids = torch.randint(4, 40, (1, 11))
    manager.prepare([0] * 11)
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert group._input is None and group._output is None, "the group let go of the step's tensors"


def test_members_in_any_order_or_alone(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    manager = _manager(model)
    adapter = make_peft_adapter(model_dir, tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"])
    slot = manager.load("a", load_adapter(adapter, model, 16))
    attn = model.model.layers[1].self_attn
    members = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(1, 5, members[0].in_features)
    manager.prepare([slot] * 3 + [0] * 2)

    def reference(m):
        out = m.base_layer(x)[0]
        r = m.ranks[slot]
        if r:
            out[:3] += x[0, :3] @ m.lora_a[slot, :r].T @ m.lora_b[slot, :, :r].T
        return out

    with torch.no_grad():
        for order in ([2, 0, 1], [1], [0, 0, 2]):
            for i in order:
                torch.testing.assert_close(
                    members[i](x)[0], reference(members[i]), rtol=1e-5, atol=1e-5
                )
    assert attn.k_proj.ranks[slot] == 0 and attn.q_proj.ranks[slot] == 4


def test_rank_table_follows_loads_and_unloads(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    manager = _manager(model)
    adapter = make_peft_adapter(
        model_dir, tmp_path / "a", r=3, target_modules=["k_proj", "up_proj"]
    )
    slot = manager.load("a", load_adapter(adapter, model, 16))
    group = model.model.layers[0].self_attn.k_proj.group
    assert group.stack.slot_ranks[slot].tolist() == [0, 3, 0]
    assert group.stack.slot_ranks.data_ptr() >= manager.rank_table.data_ptr()  # a view of the table
    assert int(manager.rank_table.sum()) == 3 * 2 * 2  # two layers x (k, up)
    manager.unload("a")
    assert int(manager.rank_table.sum()) == 0


class _Phi3Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(8, 24, bias=False)
        self.self_attn.o_proj = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(8, 32, bias=False)


def test_already_fused_projections_stay_single_layers(monkeypatch):
    """Phi-3's qkv_proj and gate_up_proj are targeted whole by its adapters: plain layers."""
    monkeypatch.setattr(
        manager_mod, "TARGET_NAMES", (*manager_mod.TARGET_NAMES, "qkv_proj", "gate_up_proj")
    )
    block = _Phi3Block()
    manager = _manager(block)
    assert isinstance(block.self_attn.qkv_proj, MultiLoRALinear)
    assert isinstance(block.mlp.gate_up_proj, MultiLoRALinear)
    assert set(manager.layers) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"}
