"""Triton kernels for LoRA serving (imported as ``peftserve.kernels``).

``lora_shrink`` and ``lora_expand`` are the segmented-gather pair that
``peftserve.lora.triton_backend.TritonBackend`` runs for every LoRA-wrapped projection;
``lora_shrink_expand`` is both in one launch for decode-sized steps (the fp32 ``x @ A^T``
stays on chip); all three serve q/k/v or gate/up as slices of one launch.
``paged_attention`` reads the paged KV cache in place (``peftserve.engine.attention``).
Importing this package needs triton; set ``TRITON_INTERPRET=1`` before the import to run
the kernels on CPU tensors (tests).
"""

from .lora_expand import lora_expand
from .lora_fused import lora_shrink_expand
from .lora_shrink import lora_shrink
from .paged_attention import paged_attention

__all__ = ["lora_expand", "lora_shrink", "lora_shrink_expand", "paged_attention"]
