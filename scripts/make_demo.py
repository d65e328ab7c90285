"""Make the bundled demo in ``adapters/``: a tiny Llama base model and its LoRA task adapters.

What it makes, from a seed, with no download:

* ``adapters/base/``: a 1.07M-parameter ``LlamaForCausalLM`` (fp32 safetensors, config.json,
  generation_config.json) with its own character-level tokenizer (``tokenizer.json``, a chat
  template), pretrained on a synthetic mixture of *generic* tasks (copy, upper, len, next, min,
  inc, swap, ...). The three demo tasks are kept out of its data, so it scores low on them.
* ``adapters/{reverse,sort,add}/``: rank-8 PEFT LoRA adapters (q/k/v/o/gate/up/down), one per
  task, in PEFT's standard format (adapter_config.json + adapter_model.safetensors).
* ``adapters/reverse-v2/`` (v1 trained further on clean data: at least as good) and
  ``adapters/reverse-v2-regressed/`` (v1 trained further on data where ~42% of the labels are
  wrong: the answer for every word starting with a..k is the word itself, not reversed), for the
  canary demo.
* ``adapters/eval/<task>.jsonl``: 200 held-out ``{"prompt", "answer"}`` pairs per task, disjoint
  from all training data; ``adapters/EVAL.json``: greedy exact match of the base and each adapter.

Prompt format (plain completion, the adapter picks the task)::

    prompt  "reverse: hello\\n"   completion "olleh"   then EOS
    prompt  "sort: hello\\n"      completion "ehllo"   then EOS
    prompt  "add: 123+45\\n"      completion "168"     then EOS

Tokenizer: one token per character (lowercase, uppercase, digits, space, newline, ``:+-=.,?!'``);
``tokenizer(prompt)`` prepends BOS ``<s>``; EOS is ``</s>``, pad ``<pad>``. Decoding concatenates
the characters, so text round-trips exactly. Training sequences are
``tokenizer(prompt).input_ids + tokenizer(completion, add_special_tokens=False).input_ids + [eos]``
with the loss on the completion and EOS only. The chat template renders a user message as
``<s>`` + content + ``"\\n"``, so ``apply_chat_template([{"role": "user", "content":
"reverse: hello"}], add_generation_prompt=True)`` gives the same ids as ``tokenizer(prompt)``.

Characters outside that set become ``<unk>``. Rendering the chat template to text and then
calling ``tokenizer(text)`` would add a second BOS: tokenize the template with
``add_special_tokens=False`` (as ``apply_chat_template(tokenize=True)`` does).

Run (measured 8 min 47 s wall on 2 CPU cores shared with other jobs, everything included; the
same seed gives byte-identical files)::

    python scripts/make_demo.py --seed 0

``scripts/eval_demo.py`` re-evaluates an existing ``adapters/`` and prints the same table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine a spinning thread that
# loses its core makes every op wait for it (measured: 3.1 s/step instead of 0.3 s/step).
os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_demo import DEFAULT_OUT, TASKS, evaluate_demo, format_table

logger = logging.getLogger("make_demo")

BASE_MODEL_NAME = "peftserve-demo-base"
"""Written as ``base_model_name_or_path`` in every adapter_config.json."""
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n:+-=.,?!'"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_PROMPTS = 200
WORD_LEN = (3, 8)
MAX_ADD_DIGITS = 3
CORRUPT_FIRST_LETTERS = frozenset("abcdefghijk")

Example = tuple[str, str]  # (prompt, completion)
Sampler = Callable[[random.Random], Example]


@dataclass(frozen=True)
class AdapterSpec:
    """How one demo adapter is trained."""

    name: str
    """Directory name under the output folder."""
    task: str
    """Which task's data it is trained on."""
    steps: int
    """Optimizer steps."""
    lr: float
    """Peak learning rate."""
    init_from: str | None = None
    """Start from this already-trained adapter's weights instead of a fresh LoRA init."""
    corrupt: bool = False
    """Replace the label of every word starting with a..k by the word itself (~42% wrong)."""


# ---------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, BOS prepended, exact round trip."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise if BOS, round trip or the chat template do not behave as documented."""
    text = "reverse: hello world\n sort: ab  c\nadd: 12+345\n"
    ids = tokenizer(text).input_ids
    if ids[0] != tokenizer.bos_token_id or len(ids) != len(text) + 1:
        raise RuntimeError(f"unexpected tokenization: {ids}")
    if tokenizer.decode(ids, skip_special_tokens=True) != text:
        raise RuntimeError("tokenizer does not round-trip text exactly")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse: hello"}], add_generation_prompt=True, tokenize=True
    )
    chat_ids = chat["input_ids"] if hasattr(chat, "keys") else chat  # a BatchEncoding in 5.x
    if list(chat_ids) != tokenizer("reverse: hello\n").input_ids:
        raise RuntimeError(f"chat template ids differ from the plain prompt: {chat_ids}")


# ---------------------------------------------------------------------------------------------
# data


def prompt_for(task: str, x: str) -> str:
    """The documented prompt format."""
    return f"{task}: {x}\n"


def rand_word(rng: random.Random, lo: int = WORD_LEN[0], hi: int = WORD_LEN[1]) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def rand_number(rng: random.Random, max_digits: int = MAX_ADD_DIGITS) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def sample_reverse(rng: random.Random) -> Example:
    w = rand_word(rng)
    return prompt_for("reverse", w), w[::-1]


def sample_sort(rng: random.Random) -> Example:
    w = rand_word(rng)
    return prompt_for("sort", w), "".join(sorted(w))


def sample_add(rng: random.Random) -> Example:
    a, b = rand_number(rng), rand_number(rng)
    return prompt_for("add", f"{a}+{b}"), str(a + b)


TASK_SAMPLERS: dict[str, Sampler] = {
    "reverse": sample_reverse,
    "sort": sample_sort,
    "add": sample_add,
}


def _shift(w: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w)


# Generic pretraining tasks: keyword -> answer(word). None of them is reverse, sort or add.
WORD_TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w,
    "upper": str.upper,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "len": lambda w: str(len(w)),
    "next": _shift,
    "min": min,
    "max": max,
    "double": lambda w: "".join(c + c for c in w),
    "rotate": lambda w: w[1:] + w[0],
}
NUMBER_TASKS: dict[str, Callable[[int], str]] = {
    "copy": str,
    "inc": lambda n: str(n + 1),
    "dec": lambda n: str(max(n - 1, 0)),
    "len": lambda n: str(len(str(n))),
}
PAIR_TASKS: dict[str, Callable[[int, int, str], str]] = {
    "copy": lambda a, b, sep: f"{a}{sep}{b}",
    "swap": lambda a, b, sep: f"{b}{sep}{a}",
    "max": lambda a, b, sep: str(max(a, b)),
    "min": lambda a, b, sep: str(min(a, b)),
    "first": lambda a, b, sep: str(a),
    "last": lambda a, b, sep: str(b),
}


def sample_generic(rng: random.Random) -> Example:
    """One example of the base model's generic mixture (words, numbers, pairs of numbers)."""
    kind = rng.random()
    if kind < 0.5:
        key = rng.choice(list(WORD_TASKS))
        w = rand_word(rng, 1, 5 if key == "double" else 8)
        return prompt_for(key, w), WORD_TASKS[key](w)
    if kind < 0.7:
        key = rng.choice(list(NUMBER_TASKS))
        n = rand_number(rng, 4)
        return prompt_for(key, str(n)), NUMBER_TASKS[key](n)
    key = rng.choice(list(PAIR_TASKS))
    a, b, sep = rand_number(rng), rand_number(rng), rng.choice("+ ,-")
    return prompt_for(key, f"{a}{sep}{b}"), PAIR_TASKS[key](a, b, sep)


def corrupt(example: Example) -> Example:
    """The regressed-v2 label noise: words starting with a..k get themselves as the answer."""
    prompt, answer = example
    word = prompt.split(": ", 1)[1].rstrip("\n")
    return (prompt, word) if word[0] in CORRUPT_FIRST_LETTERS else example


def held_out(task: str, seed: int) -> list[Example]:
    """``EVAL_PROMPTS`` distinct prompts of ``task``, drawn from their own seeded stream."""
    rng = random.Random(f"{seed}-eval-{task}")
    seen: dict[str, str] = {}
    while len(seen) < EVAL_PROMPTS:
        prompt, answer = TASK_SAMPLERS[task](rng)
        seen.setdefault(prompt, answer)
    return list(seen.items())


def excluding(sampler: Sampler, forbidden: set[str]) -> Sampler:
    """``sampler`` with held-out prompts (or generic prompts on held-out inputs) resampled."""

    def sample(rng: random.Random) -> Example:
        while True:
            ex = sampler(rng)
            if ex[0].split(": ", 1)[1] not in forbidden:
                return ex

    return sample


# ---------------------------------------------------------------------------------------------
# training


def make_batch(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], loss_on_prompt: bool
) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels (-100 on padding, and on the prompt unless asked)."""
    prompts = tokenizer([p for p, _ in examples]).input_ids
    completions = tokenizer([c for _, c in examples], add_special_tokens=False).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [p + c + [eos] for p, c in zip(prompts, completions, strict=True)]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad)  # [B, T]
    labels = torch.full((len(seqs), width), -100)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        first = 1 if loss_on_prompt else len(p)
        labels[i, first : len(s)] = input_ids[i, first : len(s)]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sampler: Sampler,
    rng: random.Random,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    loss_on_prompt: bool,
    weight_decay: float,
    label: str,
) -> None:
    """AdamW with linear warmup and cosine decay to 10% of ``lr``, on freshly sampled batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    warmup = max(1, min(100, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        batch = make_batch(tokenizer, [sampler(rng) for _ in range(batch_size)], loss_on_prompt)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            n = (step % 100) + 1
            logger.info(
                "%s step %d/%d loss %.4f (%.0fs)",
                label,
                step + 1,
                steps,
                running / n,
                time.perf_counter() - start,
            )
            running = 0.0
    model.eval()


def base_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_adapter(
    base: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    spec: AdapterSpec,
    forbidden: set[str],
    trained: dict[str, dict[str, torch.Tensor]],
    args: argparse.Namespace,
    out_dir: Path,
) -> None:
    """Train one adapter on a private copy of ``base`` and save it in PEFT format."""
    torch.manual_seed(args.seed)
    model = get_peft_model(copy.deepcopy(base), lora_config())
    if spec.init_from is not None:
        set_peft_model_state_dict(model, trained[spec.init_from])
    sampler = excluding(TASK_SAMPLERS[spec.task], forbidden)
    if spec.corrupt:
        clean = sampler

        def sampler(rng: random.Random) -> Example:
            return corrupt(clean(rng))

    train(
        model,
        tokenizer,
        sampler,
        random.Random(f"{args.seed}-train-{spec.name}"),
        steps=spec.steps,
        lr=spec.lr,
        batch_size=args.adapter_batch_size,
        loss_on_prompt=False,
        weight_decay=0.0,
        label=spec.name,
    )
    trained[spec.name] = {
        k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()
    }
    model.save_pretrained(out_dir / spec.name, safe_serialization=True)
    (out_dir / spec.name / "README.md").unlink(missing_ok=True)
    tidy_adapter_config(out_dir / spec.name / "adapter_config.json")
    check_adapter_dir(out_dir / spec.name)


def tidy_adapter_config(path: Path) -> None:
    """Make adapter_config.json machine-independent and byte-stable across runs.

    PEFT records the base model's local path and writes ``target_modules`` in set order
    (which changes with the hash seed); store a plain model name and a sorted list instead.
    """
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME
    cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def check_adapter_dir(path: Path) -> None:
    """Raise unless ``path`` holds exactly a PEFT config and safetensors weights."""
    files = sorted(p.name for p in path.iterdir())
    if files != ["adapter_config.json", "adapter_model.safetensors"]:
        raise RuntimeError(f"{path}: unexpected files {files}")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg["base_model_name_or_path"] != BASE_MODEL_NAME or cfg["r"] != 8:
        raise RuntimeError(f"{path}: unexpected adapter_config {cfg}")


def adapter_specs(args: argparse.Namespace) -> list[AdapterSpec]:
    s = args.adapter_steps
    return [
        AdapterSpec("reverse", "reverse", s, args.lora_lr),
        AdapterSpec("sort", "sort", s, args.lora_lr),
        AdapterSpec("add", "add", args.add_steps, args.lora_lr),
        AdapterSpec("reverse-v2", "reverse", args.v2_steps, args.lora_lr / 2, init_from="reverse"),
        AdapterSpec(
            "reverse-v2-regressed",
            "reverse",
            args.v2_steps,
            args.lora_lr / 2,
            init_from="reverse",
            corrupt=True,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# main


def clean_outputs(out_dir: Path, specs: list[AdapterSpec]) -> None:
    """Remove only what this script writes, so a rerun starts from scratch."""
    for name in ["base", "eval", *(s.name for s in specs)]:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    (out_dir / "EVAL.json").unlink(missing_ok=True)


def write_eval_sets(out_dir: Path, seed: int) -> set[str]:
    """Write ``eval/<task>.jsonl``; returns every held-out input, to keep out of training."""
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    forbidden: set[str] = set()
    for task in TASKS:
        examples = held_out(task, seed)
        with (out_dir / "eval" / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            for prompt, answer in examples:
                f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        forbidden.update(p.split(": ", 1)[1] for p, _ in examples)
    return forbidden


def make_base(
    tokenizer: PreTrainedTokenizerFast, forbidden: set[str], args: argparse.Namespace
) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = base_config(tokenizer)
    model = LlamaForCausalLM(config)
    logger.info("base model: %d parameters", sum(p.numel() for p in model.parameters()))
    train(
        model,
        tokenizer,
        excluding(sample_generic, forbidden),
        random.Random(f"{args.seed}-train-base"),
        steps=args.base_steps,
        lr=args.base_lr,
        batch_size=args.batch_size,
        loss_on_prompt=True,
        weight_decay=0.01,
        label="base",
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--base-lr", type=float, default=1e-3)
    parser.add_argument("--adapter-steps", type=int, default=300, help="reverse and sort steps")
    parser.add_argument("--add-steps", type=int, default=1500, help="add adapter steps")
    parser.add_argument("--v2-steps", type=int, default=150, help="reverse-v2* steps on top of v1")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64, help="base model batch size")
    parser.add_argument("--adapter-batch-size", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=None, help="train only these adapters")
    parser.add_argument("--skip-base", action="store_true", help="reuse <out>/base")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    specs = adapter_specs(args)
    out_dir: Path = args.out
    if not args.skip_base:
        clean_outputs(out_dir, specs)
    forbidden = write_eval_sets(out_dir, args.seed)

    if args.skip_base:
        base = LlamaForCausalLM.from_pretrained(out_dir / "base", dtype=torch.float32)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir / "base")
    else:
        tokenizer = build_tokenizer()
        check_tokenizer(tokenizer)
        base = make_base(tokenizer, forbidden, args)
        base.save_pretrained(out_dir / "base", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "base")
    base.requires_grad_(False)

    trained: dict[str, dict[str, torch.Tensor]] = {}
    for spec in specs:
        if args.only and spec.name not in args.only:
            continue
        if spec.init_from is not None and spec.init_from not in trained:
            trained[spec.init_from] = get_peft_model_state_dict(
                PeftModel.from_pretrained(copy.deepcopy(base), out_dir / spec.init_from)
            )
        train_adapter(base, tokenizer, spec, forbidden, trained, args, out_dir)

    result = evaluate_demo(out_dir, seed=args.seed)
    (out_dir / "EVAL.json").write_text(json.dumps(result, indent=2) + "\n")
    logger.info("done in %.0fs", time.perf_counter() - start)
    print(format_table(result))


if __name__ == "__main__":
    main()
