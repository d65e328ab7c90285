"""Loads the base model, owns the KV cache, and runs one packed step through the model.

A step's scheduled tokens (prefill chunks and decode tokens, ordered by LoRA slot) are
flattened into one sequence ``input_ids [1, T]`` with per-token ``position_ids [1, T]``.
``prepare`` writes everything the step needs (token ids, positions, cache slots, the
varlen attention description, the LoRA segments, the per-row sampling parameters) into the
step buffers (``peftserve.engine.step_buffers``) in one pass over the sequences and copies
them to the device in one non-blocking copy; the attention metadata
(``attention.PagedAttentionMetadata``), the LoRA segments and the sampler's tensors are views
of those buffers. Logits are computed only for the rows that are sampled or scored.

Decode-only steps may run padded to a batch-size bucket over the same buffers
(``DecodeGraphs``): replayed from CUDA graphs on CUDA, eagerly elsewhere (tests). Padding
sequences own one row each, have ``seq_len`` 0, write their K/V into the SCRATCH block and
use no adapter; their logits are dropped.
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
    ATTN_IMPLEMENTATIONS,
    METADATA_KWARG,
    PagedAttentionMetadata,
    attention_implementation,
)
from peftserve.engine.block_manager import RESERVED_BLOCKS, SCRATCH_BLOCK
from peftserve.engine.cuda_graphs import DecodeGraphs, decode_buckets
from peftserve.engine.families import check_model_config, check_model_type
from peftserve.engine.sampler import LogitBias, PenaltyTensors, RowParams, SamplingTensors
from peftserve.engine.scheduler import SchedulerOutput
from peftserve.engine.sequence import Sequence
from peftserve.engine.step_buffers import StepBuffers
from peftserve.lora.manager import LoRAManager
from peftserve.lora.metadata import Segment

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CUDA_KV_FRACTION = 0.9
_CPU_KV_BYTES = 1 << 30


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T] view of the step buffers
    position_ids: torch.Tensor  # [1, T]
    attn: PagedAttentionMetadata
    logits_to_keep: int | torch.Tensor
    """0: every row (each row is sampled, in order); else [S + P] rows: sampled, then scored."""
    sample_seqs: list[Sequence]  # [S]
    score_rows: list[tuple[Sequence, int]]  # [P] (sequence, index of the prompt token scored)
    sampling: SamplingTensors
    bucket: int | None
    """Padded decode step: its batch-size bucket (T = N = bucket)."""


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
    check_model_type(json.loads((path / "config.json").read_text()).get("model_type"))
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
        check_model_config(self.hf_config, self.max_model_len)
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
        self._kv = torch.zeros(
            layers, 2, kv_heads, total_blocks * self.block_size, head_dim, dtype=self.dtype, device=self.device
        )  # [L, 2, Hkv, (num_blocks + RESERVED_BLOCKS) * block_size, D]: one tensor, so one launch zeroes blocks
        self.kv_caches = list(self._kv.unbind(0))  # per layer [2, Hkv, S, D] (views)
        self.max_blocks = -(-self.max_model_len // self.block_size)
        """Block-table width: blocks of a sequence of max_model_len tokens."""
        self.buffers = StepBuffers(sched.max_num_batched_tokens, sched.max_num_seqs, self.max_blocks, self.device)
        self.lora_manager.meta.bind(self.buffers.host_tensor("lora_segments"), self.buffers.dev["lora_segments"])
        self._table_rows: list[tuple[Sequence | None, int, int]] = [(None, 0, 0)] * sched.max_num_seqs
        """Per block-table row of the host buffer: (sequence, entries written, its preemptions)."""
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.model.cuda_graphs:
            self.use_decode_graphs(capture=True)
        logger.info(
            "model %s (%s) on %s/%s; KV cache %d blocks x %d tokens; max_model_len %d; decode %s",
            config.model.model, self.hf_config.model_type, self.device, self.dtype,
            self.num_blocks, self.block_size, self.max_model_len,
            "in CUDA graphs" if self.graphs is not None and self.graphs.capture else "eager",
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
        """Clear KV blocks in every layer (fresh blocks, and a sequence's after it produced
        non-finite values), in one launch."""
        if not blocks:
            return
        layers, two, kv_heads, _, head_dim = self._kv.shape
        paged = self._kv.view(layers, two, kv_heads, -1, self.block_size, head_dim)
        paged.index_fill_(3, self._tensor(blocks), 0)

    def use_decode_graphs(self, capture: bool) -> None:
        """Run decode-only steps padded to batch-size buckets over the step buffers:
        replayed from CUDA graphs with ``capture`` (CUDA only), eagerly otherwise (the same
        padding and bucketing, testable on the CPU). ``capture=False`` on CUDA gives the eager
        twin of the graphs (for comparisons)."""
        if capture and not self._graph_safe():
            self.graphs = None
            return
        buckets = decode_buckets(self.config.scheduler.max_num_seqs)
        self.graphs = DecodeGraphs(self._forward, buckets, capture=capture)

    def use_eager_decode(self) -> None:
        """Run every step unpadded and eagerly (the default on the CPU)."""
        self.graphs = None

    def _graph_safe(self) -> bool:
        """Whether the attention and LoRA kernels of this model can be captured in a graph."""
        if self.device.type != "cuda":
            logger.info("CUDA graphs are off: the device is %s", self.device)
            return False
        attention = self.model.config._attn_implementation
        lora = self.lora_manager.backend.name
        if attention != ATTN_IMPLEMENTATIONS["triton"] or lora != "triton":
            logger.info(
                "CUDA graphs are off: they need the triton attention and LoRA backends (attention %s, LoRA %s)",
                attention, lora,
            )  # fmt: skip
            return False
        return True

    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence], SamplingTensors]:
        """Run one step; return the fp32 logits [S, V] of the sampled rows, their sequences
        and their sampling parameters.

        Prompt tokens asked for by ``score_from`` get their teacher-forced log-probabilities
        recorded in ``Sequence.prompt_logprobs`` from the same forward.
        """
        inputs = self.prepare(sched)
        with torch.inference_mode():
            if inputs.bucket is not None and self.graphs is not None:
                logits = self.graphs.run(inputs.bucket, self.lora_manager.meta.has_lora, inputs)  # [T, V]
                if self.graphs.broken:
                    self.graphs = None
            else:
                logits = self._forward(inputs)  # [S + P, V] (or [T, V])
        num_sampled, num_scored = len(inputs.sample_seqs), len(inputs.score_rows)
        logits = logits[: num_sampled + num_scored].float()  # [S + P, V]
        if inputs.score_rows:
            _record_prompt_logprobs(logits[num_sampled:], inputs.score_rows)
        return logits[:num_sampled], inputs.sample_seqs, inputs.sampling  # [S, V]

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """The model on the step's inputs; the logits of the kept rows, [rows, V]."""
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            use_cache=False,
            logits_to_keep=inputs.logits_to_keep,
            **{METADATA_KWARG: inputs.attn},
        )
        return out.logits[0]

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        """Write the step into the step buffers (one pass over its sequences, one copy)."""
        buf = self.buffers
        self._check_capacity(sched.total_tokens, len(sched.seqs))
        buf.wait_host_free()
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        segments: list[Segment] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        score_idx: list[int] = []
        score_rows: list[tuple[Sequence, int]] = []
        rows = RowParams()
        forks = {id(parent): children for parent, children in sched.forks}
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_tokens, strict=True)):
            row, start = len(ids), seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            if n == 1:
                ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                _slot_mapping(table, bs, start, end, slots)
            qsl.append(row + n)
            seq_lens.append(end)
            self._write_table_row(i, seq)
            if segments and segments[-1][2] == seq.slot:
                first, length, slot = segments[-1]
                segments[-1] = (first, length + n, slot)
            else:
                segments.append((row, n, seq.slot))
            if end == seq.num_tokens:
                for sampled in (seq, *forks.get(id(seq), ())):  # forked choices share the row
                    sample_rows.append(row + n - 1)
                    sample_seqs.append(sampled)
                    history = (sampled.token_ids, sampled.num_prompt_tokens) if sampled.params.penalized else None
                    rows.add(sampled.params, sampled.num_generated, sampled.index, history)
            if seq.params.scored_from is not None:
                _score_rows(seq, row, start, n, score_idx, score_rows)
        num_tokens, num_seqs = len(ids), len(seq_lens)
        # a decode step: all rows, in order
        every_row = len(sample_rows) == num_tokens and not score_idx and not forks
        bucket = None
        if self.graphs is not None and every_row:
            bucket = self.graphs.bucket_for(num_seqs)
        padded = bucket or num_seqs
        h = buf.host
        h["input_ids"][:num_tokens] = ids
        h["positions"][:num_tokens] = positions
        h["slot_mapping"][:num_tokens] = slots
        h["query_start_loc"][: num_seqs + 1] = qsl
        h["seq_lens"][:num_seqs] = seq_lens
        if bucket is not None and bucket > num_seqs:
            self._pad_decode(num_seqs, bucket, qsl, seq_lens)
        self._clear_table_rows(num_seqs, padded)
        logits_rows = sample_rows + score_idx
        if not every_row:
            h["logits_rows"][: len(logits_rows)] = logits_rows
        sampling = self._sampling_tensors(rows)
        self.lora_manager.meta.set_segments(segments, padded if bucket else num_tokens)
        buf.copy_to_device(padded)
        return self._step_inputs(padded if bucket else num_tokens, padded, qsl, seq_lens, sched, every_row,
                                 len(logits_rows), sample_seqs, score_rows, sampling, bucket)  # fmt: skip

    def _step_inputs(
        self, num_tokens: int, num_seqs: int, qsl: list[int], seq_lens: list[int], sched: SchedulerOutput,
        every_row: bool, num_logits: int, sample_seqs: list[Sequence], score_rows: list[tuple[Sequence, int]],
        sampling: SamplingTensors, bucket: int | None,
    ) -> StepInputs:  # fmt: skip
        d = self.buffers.dev
        attn = PagedAttentionMetadata(
            kv_caches=self.kv_caches,
            block_size=self.block_size,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            slot_mapping=d["slot_mapping"][:num_tokens],
            query_start_loc=d["query_start_loc"][: num_seqs + 1],
            seq_lens=d["seq_lens"][:num_seqs],
            block_tables=d["block_tables"][:num_seqs],
            query_start_loc_host=qsl,
            seq_lens_host=seq_lens,
            max_query_len=max(sched.num_tokens),
            max_seq_len=max(seq_lens),
            decode_only=num_tokens == num_seqs,
        )
        return StepInputs(
            input_ids=d["input_ids"][:num_tokens][None],
            position_ids=d["positions"][:num_tokens][None],
            attn=attn,
            logits_to_keep=0 if every_row else d["logits_rows"][:num_logits],
            sample_seqs=sample_seqs,
            score_rows=score_rows,
            sampling=sampling,
            bucket=bucket,
        )

    def _check_capacity(self, num_tokens: int, num_seqs: int) -> None:
        buf = self.buffers
        if num_tokens > buf.max_tokens or num_seqs > buf.max_seqs:
            raise ValueError(
                f"step of {num_tokens} tokens in {num_seqs} sequences exceeds the step buffers"
                f" ({buf.max_tokens} tokens, {buf.max_seqs} sequences)"
            )

    def _write_table_row(self, i: int, seq: Sequence) -> None:
        """Block-table row ``i`` of the host buffer := ``seq``'s table, zero (PAD) after it.

        Only what changed is written: a running sequence's table only grows at its end
        until it is preempted (which the preemption count tells)."""
        table = seq.block_table
        k = len(table)
        if k > self.max_blocks:
            raise ValueError(f"{seq.request_id}: {k} KV blocks, more than the {self.max_blocks} of max_model_len")
        owner, written, preemptions = self._table_rows[i]
        if owner is seq and preemptions == seq.num_preemptions and written <= k:
            if written < k:
                self.buffers.host["block_tables"][i, written:k] = table[written:k]
        else:
            row = self.buffers.host["block_tables"][i]
            row[:k] = table
            if written > k:
                row[k:written] = 0
        self._table_rows[i] = (seq, k, seq.num_preemptions)

    def _clear_table_rows(self, start: int, end: int) -> None:
        """Rows ``start .. end`` (padding sequences) := all PAD."""
        for i in range(start, end):
            owner, written, _ = self._table_rows[i]
            if owner is not None or written:
                self.buffers.host["block_tables"][i, :written] = 0
                self._table_rows[i] = (None, 0, 0)

    def _pad_decode(self, num_seqs: int, bucket: int, qsl: list[int], seq_lens: list[int]) -> None:
        """Padding sequences ``num_seqs .. bucket``: one row each, seq_len 0, K/V to SCRATCH."""
        h = self.buffers.host
        pad = slice(num_seqs, bucket)
        h["input_ids"][pad] = 0
        h["positions"][pad] = 0
        h["slot_mapping"][pad] = SCRATCH_BLOCK * self.block_size
        qsl.extend(range(num_seqs + 1, bucket + 1))
        seq_lens.extend([0] * (bucket - num_seqs))
        h["query_start_loc"][num_seqs + 1 : bucket + 1] = qsl[num_seqs + 1 :]
        h["seq_lens"][pad] = 0

    def _sampling_tensors(self, rows: RowParams) -> SamplingTensors:
        h, d = self.buffers.host, self.buffers.dev
        n, r, k = rows.num_rows, len(rows.seeded_rows), len(rows.logprob_rows)
        h["temperature"][:n] = rows.temps
        h["top_k"][:n] = rows.top_k
        h["top_p"][:n] = rows.top_p
        if r:
            h["seed_key"][:r] = rows.seed_keys
            h["seeded_rows"][:r] = rows.seeded_rows
        if k:
            h["logprob_rows"][:k] = rows.logprob_rows
        return SamplingTensors(
            temperature=d["temperature"][:n],
            top_k=d["top_k"][:n],
            top_p=d["top_p"][:n],
            seed_key=d["seed_key"][:r],
            seeded_rows=d["seeded_rows"][:r],
            logprob_rows=d["logprob_rows"][:k],
            host=rows,
            penalties=PenaltyTensors.build(rows, self.hf_config.vocab_size, self.device),
            bias=LogitBias.build(rows, self.device),
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """KV block ``dst`` := block ``src`` in every layer, for each (src, dst) (one launch):
        a forked choice's copy of its parent's partly filled last block."""
        if not copies:
            return
        layers, two, kv_heads, _, head_dim = self._kv.shape
        paged = self._kv.view(layers, two, kv_heads, -1, self.block_size, head_dim)
        src, dst = zip(*copies, strict=True)
        paged.index_copy_(3, self._tensor(list(dst)), paged.index_select(3, self._tensor(list(src))))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def _slot_mapping(block_table: list[int], block_size: int, start: int, end: int, out: list[int]) -> None:
    """Append the cache slots of positions ``start .. end`` (one range per block)."""
    pos = start
    while pos < end:
        block, offset = divmod(pos, block_size)
        take = min(end - pos, block_size - offset)
        base = block_table[block] * block_size + offset
        out.extend(range(base, base + take))
        pos += take


def _score_rows(
    seq: Sequence, row: int, start: int, n: int, idx: list[int], rows: list[tuple[Sequence, int]]
) -> None:
    """Rows of this chunk whose next token is a prompt token to score (teacher forcing)."""
    first = max(start, seq.params.scored_from - 1)  # row at position p predicts token p + 1
    last = min(start + n, seq.num_prompt_tokens - 1)
    for pos in range(first, last):
        idx.append(row + pos - start)
        rows.append((seq, pos + 1))


def _record_prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> None:
    """Store log p(token | prefix) for each scored prompt token, with the top-k alternatives
    its request asks for (``prompt_logprobs``); ``logits`` is [P, V] fp32."""
    targets = torch.tensor([seq.token_ids[i] for seq, i in rows], device=logits.device)  # [P]
    lp = torch.log_softmax(logits, dim=-1)  # [P, V]
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
    wants = [seq.params.prompt_logprobs or 0 for seq, _ in rows]
    k = max(wants)
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0])  # [P, k]
    top_lp, top_ids = top_lp.tolist(), top_ids.long().tolist()
    for j, ((seq, i), value) in enumerate(zip(rows, chosen, strict=True)):
        want = wants[j]  # a recompute after preemption rewrites the same value
        seq.prompt_logprobs[i] = (value, top_ids[j][:want], top_lp[j][:want])
