"""Which API model name means which engine adapter.

For now a name maps straight to a lora_id (the adapter's name) and the base model's name to
``None`` (slot 0). This is the one place a canary router (task -> version) will later sit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from peftserve.api.errors import model_not_found
from peftserve.api.schemas import ModelCard, ModelList


@dataclass
class ServedAdapter:
    name: str
    path: str
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ModelTable:
    """The base model's name and path, and the adapters served on top of it."""

    base_name: str
    base_path: str
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)

    def add_adapter(self, name: str, path: str) -> None:
        if name == self.base_name or name in self.adapters:
            raise ValueError(f"model name {name!r} is already served; adapter names must be unique")
        self.adapters[name] = ServedAdapter(name, path)

    def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)

    def resolve(self, model: str) -> str | None:
        """The lora_id for an API model name (``None`` = base model); 404 if unknown."""
        if model == self.base_name:
            return None
        if model in self.adapters:
            return model
        raise model_not_found(model)

    def cards(self) -> ModelList:
        base = ModelCard(
            id=self.base_name,
            created=self.created,
            root=self.base_path,
            max_model_len=self.max_model_len,
        )
        adapters = [
            ModelCard(id=a.name, created=a.created, root=a.path, parent=self.base_name)
            for a in self.adapters.values()
        ]
        return ModelList(data=[base, *adapters])

    def card(self, model: str) -> ModelCard:
        for card in self.cards().data:
            if card.id == model:
                return card
        raise model_not_found(model)
