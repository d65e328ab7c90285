"""LoRA injection (a module-swap pass over a plain model) and the adapter slot pool."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from peftserve.config import LoRAConfig
from peftserve.lora.backend import select_backend
from peftserve.lora.layers import (
    GROUPS,
    GroupedLoRALinear,
    LoRAStack,
    LoRAStepContext,
    MultiLoRALinear,
    ProjectionGroup,
)
from peftserve.lora.metadata import LoRAStepMetadata
from peftserve.lora.peft_adapter import TARGET_NAMES, AdapterError, LoRAAdapter

logger = logging.getLogger(__name__)


def inject_lora(model: nn.Module, num_slots: int, max_rank: int, ctx: LoRAStepContext) -> dict[str, nn.Module]:
    """Replace every target ``nn.Linear`` of ``model`` with a LoRA-wrapped layer, in place.

    A module-swap pass over the plain model: siblings of one block that read the same input
    (``GROUPS``: q/k/v, gate/up) become members of one ``ProjectionGroup`` (one GEMM, one
    LoRA launch set for all of them); every other target becomes a ``MultiLoRALinear``.
    Returns module name -> wrapped layer (each with ``set_slot``).
    """
    targets = {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGET_NAMES and isinstance(module, nn.Linear)
    }
    layers: dict[str, nn.Module] = {}
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        for names in GROUPS:
            linears = [targets.get(prefix + n) for n in names]
            if not _groupable(linears):
                continue
            group = ProjectionGroup(linears, num_slots, max_rank, ctx)
            for index, (attr, linear) in enumerate(zip(names, linears, strict=True)):
                member = GroupedLoRALinear(linear, group, index)
                setattr(parent, attr, member)
                layers[prefix + attr] = member
    for name, linear in targets.items():
        if name in layers:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = MultiLoRALinear(linear, num_slots, max_rank, ctx)
        setattr(parent, attr, wrapped)
        layers[name] = wrapped
    return layers


def _groupable(linears: list[nn.Linear | None]) -> bool:
    """Siblings can share one GEMM: all present, one input size, dtype, device, bias or none."""
    if any(lin is None for lin in linears):
        return False
    first = linears[0]
    return all(
        lin.in_features == first.in_features
        and lin.weight.dtype == first.weight.dtype
        and lin.weight.device == first.weight.device
        and (lin.bias is None) == (first.bias is None)
        for lin in linears
    )


def stacks_of(layers: dict[str, nn.Module]) -> list[LoRAStack]:
    """The distinct LoRA stacks behind the wrapped layers (a group's members share one)."""
    seen: dict[int, LoRAStack] = {}
    for layer in layers.values():
        seen.setdefault(id(layer.stack), layer.stack)
    return list(seen.values())


class SlotsBusy(RuntimeError):
    """Every adapter slot holds an adapter with running requests; try again when one ends."""


class LoRAManager:
    """Owns the wrapped layers, the slot table (the GPU tier) and the per-step metadata.

    Slot ids are the same in every layer: slot ``k`` is one adapter everywhere, with rank
    0 in the layers it does not target. Loading and unloading must happen between steps.
    The resident adapters are kept in least-recently-used order (``touch``, ``lru``) for
    the eviction policy of ``peftserve.lora.cache.AdapterTiers``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoRAConfig,
        max_num_tokens: int,
        max_num_seqs: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.config = config
        self.num_slots = config.max_loras + 1
        self.device = torch.device(device)
        self.meta = LoRAStepMetadata(max_num_tokens, max_num_seqs, self.device)
        self.backend = select_backend(config.lora_backend, self.device)
        self.ctx = LoRAStepContext(self.backend, self.meta)
        self.layers = inject_lora(model, self.num_slots, config.max_lora_rank, self.ctx)
        self.stacks = stacks_of(self.layers)
        sizes = [stack.slot_ranks.numel() for stack in self.stacks]
        self.rank_table = torch.zeros(sum(sizes), dtype=torch.int32, device=self.device)
        """Every stack's [num_slots, NS] true ranks, one device tensor (each stack holds a view);
        refreshed by one copy after every load and unload, never per launch."""
        for stack, view in zip(self.stacks, self.rank_table.split(sizes), strict=True):
            stack.slot_ranks = view.view(self.num_slots, stack.num_slices)
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._free = list(range(self.num_slots - 1, 0, -1))
        logger.info(
            "LoRA: %d projections wrapped in %d launch groups, %d adapter slots, backend %s",
            len(self.layers), len(self.stacks), config.max_loras, self.backend.name,
        )

    def check(self, adapter: LoRAAdapter) -> None:
        """Raise AdapterError unless every weight of ``adapter`` fits a wrapped layer exactly."""
        unknown = set(adapter.weights) - set(self.layers)
        if unknown:
            raise AdapterError(f"adapter targets modules this model lacks: {sorted(unknown)[:3]}")
        for name, (a, b) in adapter.weights.items():
            layer = self.layers[name]
            rank = a.shape[0]
            if rank > self.config.max_lora_rank:
                raise AdapterError(f"{name}: rank {rank} is above max_lora_rank {self.config.max_lora_rank}")
            if a.shape != (rank, layer.in_features) or b.shape != (layer.out_features, rank):
                raise AdapterError(f"{name}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the layer")

    def load(self, lora_id: str, adapter: LoRAAdapter) -> int:
        """Write ``adapter`` into a free slot (or its current one) and return the slot."""
        self.check(adapter)
        slot = self._slot_of.get(lora_id)
        if slot is None:
            if not self._free:
                raise RuntimeError(f"all {self.num_slots - 1} adapter slots are in use")
            slot = self._free.pop()
        for name, layer in self.layers.items():
            a, b = adapter.weights.get(name, (None, None))
            layer.set_slot(slot, a, b)
        self._publish_ranks()
        self._slot_of[lora_id] = slot
        self._slot_of.move_to_end(lora_id)
        return slot

    def unload(self, lora_id: str) -> None:
        """Clear the adapter's slot and free it."""
        slot = self._slot_of.pop(lora_id)
        for layer in self.layers.values():
            layer.set_slot(slot, None, None)
        self._publish_ranks()
        self._free.append(slot)

    def _publish_ranks(self) -> None:
        """Copy every stack's host ranks into the device rank table (one transfer)."""
        host = torch.tensor(
            [r for stack in self.stacks for slot in range(self.num_slots) for r in (s[slot] for s in stack.ranks)],
            dtype=torch.int32,
        )  # [sum of num_slots * NS], each stack's [num_slots, NS] row-major
        self.rank_table.copy_(host)

    def slot_of(self, lora_id: str | None) -> int:
        """Slot of a loaded adapter; 0 (no adapter) for None. KeyError if not loaded."""
        return 0 if lora_id is None else self._slot_of[lora_id]

    def is_loaded(self, lora_id: str) -> bool:
        return lora_id in self._slot_of

    def touch(self, lora_id: str) -> None:
        """Mark a resident adapter as just used (most recent in the LRU order)."""
        self._slot_of.move_to_end(lora_id)

    def lru(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._slot_of)

    @property
    def loaded(self) -> dict[str, int]:
        return dict(self._slot_of)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_slots(self) -> int:
        return len(self._slot_of)

    def prepare(self, token_slots: Sequence[int]) -> None:
        """Publish this step's segments (tokens already ordered by slot) to every layer."""
        self.meta.prepare(token_slots)
