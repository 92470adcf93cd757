"""What hostd writes into a new container's layer for its agent (reddwarf.hostd.firstboot): the config, the CA
and the agent's code, with bytecode Python will accept, so a new agent does not compile its code at start."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys

from reddwarf.hostd import firstboot
from reddwarf.hostd.containers import Bootstrap

CONFIG = firstboot.agent_config(Bootstrap("127.0.0.1:1", "CA PEM", "one-time-token", "i-1"), 33061,
                                "/var/lib/mysql", "127.0.0.1")


def _pyc_valid_for(pyc: str, source: str) -> bool:
    """Python's own check of a timestamp-based .pyc (PEP 552): this interpreter's magic, flags 0, and the
    source's mtime and size as recorded when it was compiled."""
    with open(pyc, "rb") as f:
        head = f.read(16)
    st = os.stat(source)
    return (head[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(head[4:8], "little") == 0
            and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)


def test_the_agent_code_is_copied_with_valid_bytecode_and_nothing_else(tmp_path):
    upper = str(tmp_path / "upper")
    firstboot.write_firstboot(upper, CONFIG, "CA PEM")
    cfg = os.path.join(upper, firstboot.AGENT_JSON)
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    assert json.load(open(cfg))["enrollment_token"] == "one-time-token"
    lib = os.path.join(upper, firstboot.LIB_DIR, "reddwarf")
    sources, checked = [], 0
    for root, _dirs, files in os.walk(lib):
        if os.path.basename(root) == "__pycache__":
            tag = f".{sys.implementation.cache_tag}.pyc"
            assert files and all(f.endswith(tag) for f in files), files  # no optimised or foreign bytecode
            for f in files:
                src = os.path.join(os.path.dirname(root), f[: -len(tag)] + ".py")
                assert _pyc_valid_for(os.path.join(root, f), src), f
                checked += 1
        else:
            assert not [f for f in files if f.endswith(".pyc") or f == ".stamp"]
            sources += [f for f in files if f.endswith(".py")]
    assert "main.py" in sources and "backup.py" in sources
    assert checked == len(sources)  # every module has its bytecode


def test_the_copied_agent_imports_from_its_bytecode(tmp_path):
    """A module whose source is replaced by one that raises, keeping the original size and mtime, still
    imports from the copy: Python ran the copied bytecode and compiled nothing."""
    upper = str(tmp_path / "upper")
    firstboot.write_firstboot(upper, CONFIG, "CA PEM")
    lib = os.path.join(upper, firstboot.LIB_DIR)
    src = os.path.join(lib, "reddwarf", "agent", "xbstream.py")
    st = os.stat(src)
    poisoned = b"raise SystemExit('compiled from source')\n"
    with open(src, "wb") as f:
        f.write(poisoned.ljust(st.st_size, b"#"))  # same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    r = subprocess.run([sys.executable, "-B", "-c", "import reddwarf.agent.xbstream as m; print(m.__file__)"],
                       env={**os.environ, "PYTHONPATH": lib}, capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == src, r.stderr
