"""Test-session setup, loaded before any test module is collected."""

import os

import torch

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
# TRITON_INTERPRET when triton.language is first imported (its own helpers such as tl.cdiv
# are @triton.jit functions), and peft imports triton, so it must be set here, before any
# test module imports peft, transformers or triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
