"""Content addresses of adapters and fingerprints of base models.

Adapter sha256: the sha256 of the text ``"<file sha256>  <relative name>\\n"`` for each
stored file, sorted by name; this is exactly the output of ``sha256sum`` over the files
in name order, so ``sha256sum adapter_config.json adapter_model.safetensors | sha256sum``
reproduces it by hand.

Base fingerprint: the sha256 of a canonical JSON (sorted keys, no spaces) of the fields
of the base model's config that decide adapter shapes (``FINGERPRINT_FIELDS``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
)  # fmt: skip
"""Base-model config fields that decide whether an adapter's shapes fit."""


def content_sha256(file_hashes: Mapping[str, str]) -> str:
    """The adapter's address from ``{relative name: file sha256 (hex)}``."""
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 (hex) of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def base_fingerprint(config: object) -> str:
    """Fingerprint of a base model from its config.

    ``config`` is a transformers ``PretrainedConfig`` (e.g. ``model.config``), a dict of
    ``config.json``, or a path to a model directory or its ``config.json``. A missing
    ``head_dim`` counts as ``hidden_size // num_attention_heads`` and a missing
    ``num_key_value_heads`` as ``num_attention_heads``, so a config file and the config
    object transformers builds from it give the same fingerprint.
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    fields = {key: get(key) for key in FINGERPRINT_FIELDS}
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if fields["head_dim"] is None and fields["hidden_size"] and fields["num_attention_heads"]:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
