"""The step buffers: every per-step input of the model in one pinned host arena and one
device arena, at fixed addresses.

The model runner fills the host arena once per step (through numpy views: no tensor is
built from a Python list) and ``copy_to_device`` moves it in one non-blocking copy. The
device tensors the model, the attention, the LoRA layers and the sampler read are views of
the device arena, so their addresses never change: a CUDA graph captured over them stays
valid, and replaying it only needs the next step's values copied in. On the CPU the host
arena is the device arena: no copy at all.

Layout (capacities: T = max tokens of a step, N = max sequences, B = max blocks of a
sequence), fields aligned to 64 bytes, the block tables last so that the copy of a step
stops after its last live row::

    input_ids, positions, slot_mapping, logits_rows      int64 [T]
    seed_key, seeded_rows, logprob_rows                  int64 [N]
    query_start_loc                                      int32 [N + 1]
    seq_lens, top_k                                      int32 [N]
    lora_segments                                        int32 [3, N]  (start, length, slot)
    temperature, top_p                                   f32   [N]
    block_tables                                         int32 [N, B]
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64


def _fields(
    max_tokens: int, max_seqs: int, max_blocks: int
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    t, n = max_tokens, max_seqs
    return [
        ("input_ids", torch.int64, (t,)),
        ("positions", torch.int64, (t,)),
        ("slot_mapping", torch.int64, (t,)),
        ("logits_rows", torch.int64, (t,)),
        ("seed_key", torch.int64, (n,)),
        ("seeded_rows", torch.int64, (n,)),
        ("logprob_rows", torch.int64, (n,)),
        ("query_start_loc", torch.int32, (n + 1,)),
        ("seq_lens", torch.int32, (n,)),
        ("top_k", torch.int32, (n,)),
        ("lora_segments", torch.int32, (3, n)),
        ("temperature", torch.float32, (n,)),
        ("top_p", torch.float32, (n,)),
        ("block_tables", torch.int32, (n, max_blocks)),
    ]


class StepBuffers:
    """Pinned host staging and persistent device tensors for one step's inputs.

    ``host[name]`` is a numpy view of the host arena, ``dev[name]`` the tensor view of the
    device arena (the same memory on CPU).
    """

    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device
    ) -> None:
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_blocks = max_blocks
        self.device = device
        offsets: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        size = 0
        for name, dtype, shape in _fields(max_tokens, max_seqs, max_blocks):
            offsets[name] = (size, dtype, shape)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            size += -(-nbytes // _ALIGN) * _ALIGN
        on_cuda = device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.uint8, pin_memory=on_cuda)
        self._dev = torch.zeros(size, dtype=torch.uint8, device=device) if on_cuda else self._host
        self._table_offset = offsets["block_tables"][0]
        self._row_bytes = max_blocks * 4
        arena = self._host.numpy()
        self.host: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        for name, (off, dtype, shape) in offsets.items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.dev[name] = self._dev[off : off + nbytes].view(dtype).view(shape)
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self.host[name] = arena[off : off + nbytes].view(np_dtype).reshape(shape)
        self._copied = torch.cuda.Event() if on_cuda else None
        self.nbytes = size

    def host_tensor(self, name: str) -> torch.Tensor:
        """The host field ``name`` as a tensor (shares memory with ``host[name]``)."""
        return torch.from_numpy(self.host[name])

    def wait_host_free(self) -> None:
        """Block until the previous step's copy has read the host arena (CUDA only)."""
        if self._copied is not None:
            self._copied.synchronize()

    def copy_to_device(self, num_table_rows: int) -> None:
        """Copy the arena up to the end of block-table row ``num_table_rows`` (one copy)."""
        if self._copied is None:
            return  # CPU: the host arena is the device arena
        end = self._table_offset + num_table_rows * self._row_bytes
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        self._copied.record()
