"""An environment holding only what ``pip install -r requirements.txt`` installs, in seconds.

README command 1 installs peftserve and its requirements, without the extras that
requirements-dev.txt adds (triton, openai, pytest, scipy, ruff). ``runtime_environment``
builds that environment for a test without a network or a second install: a fresh virtual
environment whose site-packages links to the distributions of this one that ``peftserve``
requires, recursively (markers evaluated, extras only where a requirement asks for them). The
editable install comes along (its ``.pth`` and finder), so the code under test is this checkout.
"""

from __future__ import annotations

import sys
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def installed() -> dict[str, metadata.Distribution]:
    """This environment's distributions by normalized name (its site-packages only, not the cwd)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions(path=paths)}


def runtime_closure(root: str = "peftserve") -> dict[str, metadata.Distribution]:
    """``root`` and everything it requires, recursively, as pip would install it without extras."""
    dists = installed()
    needed: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        if key[0] not in dists:
            raise LookupError(f"{name} is required but not installed in {sys.prefix}")
        dist = needed[key[0]] = dists[key[0]]
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, frozenset(req.extras)))
    return needed


def runtime_environment(target: Path) -> Path:
    """Create the environment in ``target``; return its python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    site = Path(sysconfig.get_paths(vars={"base": str(target), "platbase": str(target)})["purelib"])
    for dist in runtime_closure().values():
        if dist.files is None:
            raise LookupError(f"{dist.metadata['Name']} lists no files (no RECORD); cannot link it")
        for top in {
            f.parts[0] for f in dist.files if f.parts and f.parts[0] not in ("..", "__pycache__")
        }:
            link, source = site / top, Path(dist.locate_file(top))
            if source.exists() and not link.exists():
                link.symlink_to(source, target_is_directory=source.is_dir())
    return target / "bin" / "python"
