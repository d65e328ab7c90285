"""peftserve: one base LLM, many LoRA adapters, adapter-level canary rollouts."""

__version__ = "0.1.0"
