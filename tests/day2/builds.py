"""A second agent build for upgrade tests: the checkout's sources with one agent module changed, as a wheel
(what an operator would ship after a fix), so its version differs from the running agent's."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from reddwarf.server.wheelhouse import SOURCE_DIRS, SOURCE_FILES, Wheelhouse, find_checkout


def build_new_agent_wheel(tmp: Path) -> Path:
    root = find_checkout()
    assert root is not None, "the tests run from a checkout"
    src = tmp / "src"
    src.mkdir(parents=True)
    for f in SOURCE_FILES:
        shutil.copy2(root / f, src / f)
    for d in SOURCE_DIRS:
        shutil.copytree(root / d, src / d, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with open(src / "agent" / "upgrade.py", "a") as f:
        f.write(f"\n# test build {uuid.uuid4().hex}\n")
    return Wheelhouse(tmp / "wheels", src).own_wheel()
