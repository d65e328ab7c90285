"""schemathesis hooks for ``tests/test_openapi_fuzz.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

Generated model names and task names are random strings, so nearly every request would stop
at a 404. These hooks send a good share of them to what the fuzzed server serves, so the
generated bodies reach tokenizing, sampling and the engine.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

MODELS = ("base", "alpha")
"""The served model names of the fuzzed server (``served_model_name`` and its adapter)."""


@schemathesis.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy:
    if isinstance(body, dict) and "model" in body:
        return st.sampled_from([body, *({**body, "model": model} for model in MODELS)])
    return st.just(body)


@schemathesis.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, parameters: Any
) -> st.SearchStrategy:
    if isinstance(parameters, dict) and "task" in parameters:
        return st.sampled_from([parameters, {**parameters, "task": "alpha"}])
    return st.just(parameters)
