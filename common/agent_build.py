"""Which build of the guest agent a piece of code is: a digest of the agent's own sources (the reddwarf.agent,
reddwarf.common and reddwarf.v1 modules), computed the same way from a running install, a checkout or a
wheel. The agent reports it on its hello; the server computes it from the wheel it ships, so it never has to
trust the guest to know what it is being upgraded to."""
from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from collections.abc import Iterable
from pathlib import Path

# The protocol generation, bumped when a change needs both ends to know of it; the digest tells builds apart.
PROTOCOL = "1"
PACKAGES = ("agent", "common", "v1")


def digest(files: Iterable[tuple[str, bytes]]) -> str:
    """`files`: ("agent/stream.py", contents) pairs, names relative to the reddwarf package."""
    h = hashlib.sha256()
    for name, data in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:12]


def _version(files: Iterable[tuple[str, bytes]]) -> str:
    return f"{PROTOCOL}+{digest(files)}"


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(f"reddwarf.{pkg}")  # found, not imported: the server may not run agent code
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version() -> str:
    """The build of the code this process runs (its reddwarf.* packages as found on its path)."""
    files: list[tuple[str, bytes]] = []
    for pkg in PACKAGES:
        root = _package_dir(pkg)
        if root is None:
            continue
        files += [(f"{pkg}/{p.name}", p.read_bytes()) for p in sorted(root.glob("*.py"))]
    return _version(files)


def wheel_version(wheel: str | Path | zipfile.ZipFile) -> str:
    """The build a reddwarf wheel carries."""
    z = wheel if isinstance(wheel, zipfile.ZipFile) else zipfile.ZipFile(wheel)
    files = []
    for name in z.namelist():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "reddwarf" and parts[1] in PACKAGES and parts[2].endswith(".py"):
            files.append((f"{parts[1]}/{parts[2]}", z.read(name)))
    return _version(files)
