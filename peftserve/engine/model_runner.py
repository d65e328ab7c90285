"""Loads the base model, owns the KV cache, and runs one packed step through the model.

A step's scheduled tokens (prefill chunks and decode tokens, ordered by LoRA slot) are
flattened into one sequence ``input_ids [1, T]`` with per-token ``position_ids [1, T]``.
The attention metadata of the step (``attention.PagedAttentionMetadata``) is built once
and passed as a forward kwarg; the LoRA segments are published once through
``LoRAManager.prepare``. Logits are computed only for the rows that are sampled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from peftserve.config import CacheConfig, EngineConfig
from peftserve.engine.attention import (
    METADATA_KWARG,
    PagedAttentionMetadata,
    attention_implementation,
)
from peftserve.engine.block_manager import PAD_BLOCK, RESERVED_BLOCKS
from peftserve.engine.scheduler import SchedulerOutput
from peftserve.engine.sequence import Sequence
from peftserve.lora.manager import LoRAManager

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CUDA_KV_FRACTION = 0.9
_CPU_KV_BYTES = 1 << 30


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    token_slots: list[int]  # [T] LoRA slot per token
    attn: PagedAttentionMetadata
    sample_idx: torch.Tensor  # [S] packed rows whose logits are sampled
    sample_seqs: list[Sequence]  # [S]
    score_rows: list[tuple[Sequence, int]]  # [P] (sequence, index of the prompt token scored)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA device is available; use device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def read_model_config(model_dir: str) -> PretrainedConfig:
    """The model's HF config; one-line ValueError for a missing dir or an unsupported family."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {path} does not exist or holds no config.json")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return AutoConfig.from_pretrained(path)


def load_model(model_dir: str, device: torch.device, dtype: torch.dtype, attention_backend: str = "auto") -> nn.Module:
    """Load the causal LM, resident in eval mode, with the paged attention switched on."""
    implementation = attention_implementation(attention_backend, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)
    model.set_attn_implementation(implementation)
    return model


def load_tokenizer(model_dir: str):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer in {model_dir}: {exc}".splitlines()[0]) from exc


def resolve_max_model_len(cache: CacheConfig, hf_config: PretrainedConfig) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if not cache.max_model_len:
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings; set max_model_len")
        return int(limit)
    if limit is not None and cache.max_model_len > limit:
        raise ValueError(f"max_model_len {cache.max_model_len} exceeds the model's {limit} positions")
    return cache.max_model_len


def kv_geometry(hf_config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim)."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return hf_config.num_hidden_layers, kv_heads, head_dim


class ModelRunner:
    """The base model (with LoRA injected), its tokenizer and the paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.hf_config = read_model_config(config.model.model)
        self.max_model_len = resolve_max_model_len(config.cache, self.hf_config)
        self.tokenizer = load_tokenizer(config.model.model)
        self.model = load_model(config.model.model, self.device, self.dtype, config.model.attention_backend)
        sched = config.scheduler
        self.lora_manager = LoRAManager(
            self.model, config.lora, sched.max_num_batched_tokens, sched.max_num_seqs, self.device, self.dtype
        )
        self.block_size = config.cache.block_size
        self.num_blocks = self._num_blocks()
        layers, kv_heads, head_dim = kv_geometry(self.hf_config)
        total_blocks = self.num_blocks + RESERVED_BLOCKS  # the PAD and SCRATCH blocks on top
        self.kv_caches = [
            torch.zeros(2, kv_heads, total_blocks * self.block_size, head_dim, dtype=self.dtype, device=self.device)
            for _ in range(layers)
        ]  # per layer [2, Hkv, (num_blocks + RESERVED_BLOCKS) * block_size, D]
        logger.info(
            "model %s (%s) on %s/%s; KV cache %d blocks x %d tokens; max_model_len %d",
            config.model.model, self.hf_config.model_type, self.device, self.dtype,
            self.num_blocks, self.block_size, self.max_model_len,
        )

    def _num_blocks(self) -> int:
        """Blocks that fit the memory budget, capped at what max_num_seqs full sequences use."""
        layers, kv_heads, head_dim = kv_geometry(self.hf_config)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        block_bytes = 2 * layers * kv_heads * head_dim * self.block_size * itemsize
        budget = self._kv_budget_bytes()
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        num_blocks = min(budget // block_bytes, blocks_per_seq * self.config.scheduler.max_num_seqs)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache budget ({budget / 2**30:.3g} GiB) holds {num_blocks * self.block_size} tokens,"
                f" fewer than max_model_len {self.max_model_len}: raise kv_cache_memory_gb or lower max_model_len"
            )
        return int(num_blocks)

    def _kv_budget_bytes(self) -> int:
        gib = self.config.cache.kv_cache_memory_gb
        if gib > 0:
            return int(gib * 2**30)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * _CUDA_KV_FRACTION)
        return _CPU_KV_BYTES

    def zero_blocks(self, blocks: list[int]) -> None:
        """Clear KV blocks in every layer (after a sequence produced non-finite values)."""
        if not blocks:
            return
        idx = self._tensor(blocks)
        for cache in self.kv_caches:
            two, kv_heads, _, head_dim = cache.shape
            cache.view(two, kv_heads, -1, self.block_size, head_dim).index_fill_(2, idx, 0)

    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; return the fp32 logits [S, V] of the sampled rows and their sequences.

        Prompt tokens asked for by ``score_from`` get their teacher-forced log-probabilities
        recorded in ``Sequence.prompt_logprobs`` from the same forward.
        """
        inputs = self.prepare(sched)
        self.lora_manager.prepare(inputs.token_slots)
        with torch.inference_mode():
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                use_cache=False,
                logits_to_keep=inputs.sample_idx,
                **{METADATA_KWARG: inputs.attn},
            )
        logits = out.logits[0].float()  # [S + P, V]
        num_sampled = len(inputs.sample_seqs)
        if inputs.score_rows:
            _record_prompt_logprobs(logits[num_sampled:], inputs.score_rows)
        return logits[:num_sampled], inputs.sample_seqs  # [S, V]

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        """Flatten a scheduled step into packed tensors and attention metadata (host work once)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_slots: list[int] = []
        sample_idx: list[int] = []
        sample_seqs: list[Sequence] = []
        query_start: list[int] = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        score_idx: list[int] = []
        score_rows: list[tuple[Sequence, int]] = []
        for seq, n in zip(sched.seqs, sched.num_tokens, strict=True):
            row, start = len(ids), seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            self._slot_mapping(seq.block_table, start, start + n, slots)
            token_slots.extend([seq.slot] * n)
            query_start.append(row + n)
            seq_lens.append(start + n)
            tables.append(seq.block_table[: -(-(start + n) // self.block_size)])
            if start + n == seq.num_tokens:
                sample_idx.append(row + n - 1)
                sample_seqs.append(seq)
            if seq.params.score_from is not None:
                _score_rows(seq, row, start, n, score_idx, score_rows)
        width = max(map(len, tables))
        attn = PagedAttentionMetadata(
            kv_caches=self.kv_caches,
            block_size=self.block_size,
            num_tokens=len(ids),
            num_seqs=len(seq_lens),
            slot_mapping=self._tensor(slots),
            query_start_loc=self._tensor(query_start, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor([t + [PAD_BLOCK] * (width - len(t)) for t in tables], torch.int32),
            query_start_loc_host=query_start,
            seq_lens_host=seq_lens,
            max_query_len=max(sched.num_tokens),
            max_seq_len=max(seq_lens),
            decode_only=len(ids) == len(seq_lens),
        )
        return StepInputs(
            input_ids=self._tensor(ids)[None],
            position_ids=self._tensor(positions)[None],
            token_slots=token_slots,
            attn=attn,
            sample_idx=self._tensor(sample_idx + score_idx),
            sample_seqs=sample_seqs,
            score_rows=score_rows,
        )

    def _slot_mapping(self, block_table: list[int], start: int, end: int, out: list[int]) -> None:
        """Append the cache slots of positions ``start .. end`` (one range per block)."""
        bs = self.block_size
        pos = start
        while pos < end:
            block, offset = divmod(pos, bs)
            take = min(end - pos, bs - offset)
            base = block_table[block] * bs + offset
            out.extend(range(base, base + take))
            pos += take

    def _tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)


def _score_rows(
    seq: Sequence, row: int, start: int, n: int, idx: list[int], rows: list[tuple[Sequence, int]]
) -> None:
    """Rows of this chunk whose next token is a prompt token to score (teacher forcing)."""
    first = max(start, seq.params.score_from - 1)  # row at position p predicts token p + 1
    last = min(start + n, seq.num_prompt_tokens - 1)
    for pos in range(first, last):
        idx.append(row + pos - start)
        rows.append((seq, pos + 1))


def _record_prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> None:
    """Store log p(token | prefix) for each scored prompt token; ``logits`` is [P, V] fp32."""
    targets = torch.tensor([seq.token_ids[i] for seq, i in rows], device=logits.device)  # [P]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].tolist()
    for (seq, i), lp in zip(rows, logprobs, strict=True):
        seq.prompt_logprobs[i] = lp  # a recompute after preemption rewrites the same value
