"""What an enrolled host installs: a directory of wheels, the reddwarf wheel and every dependency's, so
the host's venv is installed offline (`pip install --no-index --find-links`) exactly as an operator would
ship it. An operator may fill the directory; otherwise the reddwarf wheel is built from the checkout the
server runs from (`pip wheel --no-deps`, rebuilt only when the sources change) and the dependencies are
fetched once (`pip wheel`, offline first), so re-runs cost a hash of the sources."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

from reddwarf.common.errors import FailedPrecondition
from reddwarf.common.runner import CommandError, run

log = logging.getLogger("reddwarf.server.wheelhouse")

# The folders setup.py maps onto reddwarf.* (and the files that build the wheel).
SOURCE_DIRS = ("common", "server", "hostd", "agent", "clients", "gen/reddwarf/v1")
SOURCE_FILES = ("pyproject.toml", "setup.py")
BUILD_TIMEOUT = 600.0


def find_checkout() -> Path | None:
    """The source tree this server runs from (an editable install), or None for an installed wheel."""
    import reddwarf.server
    root = Path(reddwarf.server.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "reddwarf"' in pyproject.read_text() and (root / "gen/reddwarf/v1").is_dir():
        return root
    return None


def _source_files(root: Path) -> list[Path]:
    files = [root / f for f in SOURCE_FILES]
    for d in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / d):
            dirnames[:] = sorted(n for n in dirnames if n != "__pycache__" and not n.startswith("."))
            files.extend(Path(dirpath) / n for n in sorted(filenames) if not n.endswith((".pyc", ".stamp")))
    return files


def source_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in _source_files(root):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _requires(wheel: Path) -> str:
    """The wheel's Requires-Dist lines: when they change, the dependency wheels are fetched again."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = [ln for ln in z.read(meta).decode().splitlines() if ln.startswith("Requires-Dist:")
                 and "extra ==" not in ln]
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


class Wheelhouse:
    def __init__(self, directory: str | Path, source_dir: str | Path | None = None) -> None:
        self.dir = Path(directory)
        self.source = Path(source_dir) if source_dir else find_checkout()
        self._lock = threading.Lock()

    def ensure(self) -> list[Path]:
        """Every wheel an enrolled host needs, building or fetching what is missing. Blocking."""
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            own = self._own_wheel()
            self._dependencies(own)
            return sorted(self.dir.glob("*.whl"))

    def own_wheel(self) -> Path:
        """The reddwarf wheel alone (built when missing or stale), without the dependencies. Blocking."""
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            return self._own_wheel()

    def _own_wheel(self) -> Path:
        existing = sorted(self.dir.glob("reddwarf-*.whl"))
        if self.source is None:
            if not existing:
                raise FailedPrecondition(f"the wheelhouse {self.dir} holds no reddwarf wheel and this server runs "
                                         "from no source checkout to build one; put the wheels there "
                                         "(pip wheel reddwarf -w DIR)", field="id")
            return existing[-1]
        digest = source_digest(self.source)
        stamp = self.dir / ".source-digest"
        if existing and stamp.exists() and stamp.read_text().strip() == digest:
            return existing[-1]
        with tempfile.TemporaryDirectory(prefix="rd-wheel-") as tmp:
            # A copy of just the package folders: an in-tree build would leave build/ behind in the checkout
            # and could pick up stale files from it.
            src = Path(tmp) / "src"
            for f in SOURCE_FILES:
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.source / f, src / f)
            for d in SOURCE_DIRS:
                shutil.copytree(self.source / d, src / d, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            out = Path(tmp) / "out"
            try:
                run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                     "--disable-pip-version-check", "-w", str(out), str(src)], timeout=BUILD_TIMEOUT)
            except CommandError as e:
                raise FailedPrecondition(f"building the reddwarf wheel failed: {str(e)[-500:]}", field="id") from None
            built = sorted(out.glob("reddwarf-*.whl"))
            if not built:
                raise FailedPrecondition("pip wheel produced no reddwarf wheel", field="id")
            for old in existing:
                old.unlink()
            target = self.dir / built[0].name
            shutil.move(str(built[0]), target)
        stamp.write_text(digest + "\n")
        log.info("reddwarf wheel built", extra={"wheel": target.name})
        return target

    def _dependencies(self, own: Path) -> None:
        stamp = self.dir / ".deps-digest"
        want = _requires(own)
        if stamp.exists() and stamp.read_text().strip() == want:
            return
        with tempfile.TemporaryDirectory(prefix="rd-wheel-") as tmp:
            # pip is given a copy: it saves the wheels it resolves into the wheelhouse, this one included.
            req = Path(tmp) / own.name
            shutil.copy2(own, req)
            base = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--find-links", str(self.dir), "-w", str(self.dir), str(req)]
            try:  # offline first: a wheelhouse that already holds everything needs no index
                run([*base[:4], "--no-index", *base[4:]], timeout=BUILD_TIMEOUT)
            except CommandError:
                try:
                    run(base, timeout=BUILD_TIMEOUT)
                except CommandError as e:
                    raise FailedPrecondition(f"fetching the dependency wheels failed: {str(e)[-500:]}",
                                             field="id") from None
        stamp.write_text(want + "\n")
        log.info("dependency wheels ready", extra={"wheels": len(list(self.dir.glob("*.whl")))})

    @staticmethod
    def digest(wheels: list[Path]) -> str:
        """The wheel set (names and sizes; the reddwarf wheel by content, as it is rebuilt under one version):
        a host that installed this very set skips pip."""
        h = hashlib.sha256()
        for w in wheels:
            own = hashlib.sha256(w.read_bytes()).hexdigest() if w.name.startswith("reddwarf-") else ""
            h.update(f"{w.name}:{w.stat().st_size}:{own}\n".encode())
        return h.hexdigest()
