"""Re-evaluate the bundled demo in ``adapters/`` and print its exact-match table.

Loads ``adapters/base`` and every adapter in ``DEMO_ADAPTERS`` with transformers and peft
(offline, nothing is downloaded), decodes the held-out prompts in ``adapters/eval/<task>.jsonl``
greedily until EOS, and compares the decoded completion with the answer exactly. The base model
alone (adapter disabled) is scored on the same prompts. Takes well under a minute on 2 CPU cores.

    python scripts/eval_demo.py                # print the table
    python scripts/eval_demo.py --write        # also rewrite adapters/EVAL.json

``scripts/make_demo.py`` calls :func:`evaluate_demo` after training, so both report the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see make_demo.py).
os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger("eval_demo")

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "adapters"
TASKS = ("reverse", "sort", "add")
# adapter directory name -> the task it answers
DEMO_ADAPTERS = {
    "reverse": "reverse",
    "sort": "sort",
    "add": "add",
    "reverse-v2": "reverse",
    "reverse-v2-regressed": "reverse",
}
MAX_NEW_TOKENS = 16
EVAL_BATCH = 256


def read_eval_set(path: Path) -> list[dict[str, str]]:
    """Read one ``{"prompt": ..., "answer": ...}`` JSONL file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def greedy_complete(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> list[str]:
    """Greedy completions of ``prompts``, decoded up to (not including) EOS.

    Prompts are tokenized exactly as the server does (``tokenizer(prompt)``, BOS added by the
    tokenizer) and batched by token length, so no batch needs padding.
    """
    eos = tokenizer.eos_token_id
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer(p).input_ids for p in prompts]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    for length, idx in sorted(by_len.items()):
        for start in range(0, len(idx), EVAL_BATCH):
            chunk = idx[start : start + EVAL_BATCH]
            input_ids = torch.tensor([encoded[i] for i in chunk])  # [B, L]
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )  # [B, L + new]
            for row, i in zip(gen[:, length:].tolist(), chunk, strict=True):
                if eos in row:
                    row = row[: row.index(eos)]
                out[i] = tokenizer.decode(row, skip_special_tokens=False)
    return out


def exact_match(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, str]]
) -> float:
    """Share of ``examples`` whose greedy completion equals the answer exactly."""
    preds = greedy_complete(model, tokenizer, [e["prompt"] for e in examples])
    hits = sum(p == e["answer"] for p, e in zip(preds, examples, strict=True))
    return hits / len(examples)


def evaluate_demo(out_dir: Path, seed: int | None = None) -> dict:
    """Score the base model and every demo adapter under ``out_dir``; returns the EVAL.json dict."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "base")
    base = AutoModelForCausalLM.from_pretrained(out_dir / "base", dtype=torch.float32)
    base.eval()
    eval_sets = {t: read_eval_set(out_dir / "eval" / f"{t}.jsonl") for t in TASKS}
    names = [n for n in DEMO_ADAPTERS if (out_dir / n / "adapter_config.json").exists()]
    if not names:
        raise FileNotFoundError(f"no demo adapters under {out_dir}")
    model = PeftModel.from_pretrained(base, out_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(out_dir / name, adapter_name=name)
    model.eval()

    result: dict = {
        "seed": seed,
        "prompts_per_task": {t: len(e) for t, e in eval_sets.items()},
        "decoding": f"greedy until EOS, at most {MAX_NEW_TOKENS} new tokens; exact string match",
        "base": {},
        "adapters": {},
    }
    with model.disable_adapter():
        for task, examples in eval_sets.items():
            result["base"][task] = exact_match(model, tokenizer, examples)
            logger.info("base on %s: %.3f", task, result["base"][task])
    for name in names:
        task = DEMO_ADAPTERS[name]
        model.set_adapter(name)
        em = exact_match(model, tokenizer, eval_sets[task])
        result["adapters"][name] = {"task": task, "exact_match": em}
        logger.info("adapter %s on %s: %.3f", name, task, em)
    return result


def format_table(result: dict) -> str:
    """The exact-match figures as a plain-text table."""
    lines = [f"{'adapter':<22}{'task':<9}{'adapter EM':>11}{'base EM':>9}"]
    for name, row in result["adapters"].items():
        task = row["task"]
        lines.append(f"{name:<22}{task:<9}{row['exact_match']:>11.3f}{result['base'][task]:>9.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="demo directory")
    parser.add_argument("--write", action="store_true", help="rewrite <out>/EVAL.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    seed = None
    eval_json = args.out / "EVAL.json"
    if eval_json.exists():
        seed = json.loads(eval_json.read_text()).get("seed")
    result = evaluate_demo(args.out, seed=seed)
    if args.write:
        eval_json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))


if __name__ == "__main__":
    main()
