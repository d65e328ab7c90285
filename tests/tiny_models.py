"""Tiny random models and PEFT adapters, built in a temporary directory for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2")
MORE_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "llama3")
"""Tiny models of the later families (``llama3``: Llama with Llama 3's rope scaling)."""
_CONFIGS = {
    "llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
    "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config, "llama3": LlamaConfig,
}  # fmt: skip
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=32,
)  # fmt: skip
_FAMILY_DEFAULTS: dict[str, dict] = {
    # The features that set each family apart, switched on at sizes the tiny prompts reach:
    # windows shorter than the prompts, a query scale other than head_dim ** -0.5, rope
    # scalings whose wavelengths the prompt positions cross, soft-caps below the tiny model's
    # attention scores (about 10) and logits (about 3). Gemma's embeddings stay untied: tied
    # to scaled random embeddings, the tiny model only echoes its last token.
    "qwen3": dict(head_dim=16),
    "gemma2": dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, tie_word_embeddings=False,
    ),
    "gemma3_text": dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
        },
    ),
    "phi3": dict(sliding_window=12),
    "llama3": dict(rope_parameters=LLAMA3_ROPE),
}  # fmt: skip
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +-=:.,!?\n")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every character is one token, decoding is exact."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_byte_bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as Llama 3 and Qwen2 have), trained on a few sentences."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "reverse: hello world", *CHARS]
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    tmp_path: Path,
    family: str = "llama",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **overrides,
) -> Path:
    """Save a random 2-layer model of ``family`` with its tokenizer (by default the
    character-level ``make_tokenizer()``); return the directory.

    ``family`` is a key of ``_CONFIGS`` (a model_type, or ``llama3``)."""
    torch.manual_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    kwargs.update(_FAMILY_DEFAULTS.get(family, {}))
    kwargs.update(overrides)
    config = _CONFIGS[family](**kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than default init so logits are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.2)
    out = Path(tmp_path) / f"tiny-{family}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_peft_adapter(
    model_dir: Path,
    out_dir: Path,
    r: int = 4,
    target_modules: list[str] | str = ("q_proj", "v_proj"),
    seed: int = 1,
    std: float = 0.1,
    **lora_kwargs,
) -> Path:
    """Make a PEFT LoRA adapter with random (non-zero) A and B for the model in ``model_dir``."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, target_modules=targets, init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
