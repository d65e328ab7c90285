"""Triton kernels for LoRA serving (imported as ``peftserve.kernels``).

``lora_shrink`` and ``lora_expand`` are the segmented-gather pair that
``peftserve.lora.triton_backend.TritonBackend`` runs for every LoRA-wrapped projection;
``lora_shrink_expand`` is both in one launch for decode-sized steps (the fp32 ``x @ A^T``
stays on chip); all three serve q/k/v or gate/up as slices of one launch.
``paged_attention`` reads the paged KV cache in place (``peftserve.engine.attention``).
Importing this package needs triton; set ``TRITON_INTERPRET=1`` before the import to run
the kernels on CPU tensors (tests).

This folder sits in the repository root, so whenever the root is on ``sys.path`` (the
current directory under ``python -m`` or ``python -c``) Python also finds it as a top-level
package named ``kernels``: the name of Hugging Face's kernels package, which transformers
probes for. Imported under any name but ``peftserve.kernels`` it hands the name over (see
``_hand_over``) and defines nothing.
"""

if __name__ == "peftserve.kernels":
    from .lora_expand import lora_expand
    from .lora_fused import lora_shrink_expand
    from .lora_shrink import lora_shrink
    from .paged_attention import paged_attention

    __all__ = ["lora_expand", "lora_shrink", "lora_shrink_expand", "paged_attention"]
else:
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _hand_over(name: str, root: str) -> None:
        """Put what ``import name`` finds without ``root`` on the path into ``sys.modules``.

        That is the installed package of that name if there is one; otherwise an empty
        namespace package, which transformers (``_is_package_available``) reads as "not
        installed", as it would read no package at all.
        """
        path = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != root]
        spec = None
        for finder in _sys.meta_path:
            if finder is _machinery.PathFinder:
                spec = finder.find_spec(name, path)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, None)
            if spec is not None:
                break
        if spec is None:
            spec = _machinery.ModuleSpec(name, None, is_package=True)
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module  # the import statement returns this module, not this file
        if spec.loader is not None:
            spec.loader.exec_module(module)

    _hand_over(__name__, _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__))))
