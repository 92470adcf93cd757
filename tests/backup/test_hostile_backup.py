"""A tenant's backup stream as an attacker would write it: the proof restore (server/backups.py through
agent/sandbox.py and agent/verify.py) and the guest's own restore refuse or contain each trick.

The stream is a real mariadb-backup of a scratch mariadbd, taken apart and put back together with one
hostile change: plugins named in backup-my.cnf, files outside the allowlist (path traversal, absolute
paths, a shared object, a tablespace link). Around a real proof restore the tests watch /proc: every
mariadb-backup and mariadbd runs as the sandbox uid in another network namespace and listens on nothing,
and from inside the sandbox the server's CA key, KEK and state dir are not there to read.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from reddwarf.agent import sandbox, xbstream
from reddwarf.agent.backup import BackupRunner, BackupSettings, MysqlAccess
from reddwarf.server.backups import Backups
from reddwarf.server.settings import Settings
from reddwarf.v1 import agent_pb2, host_pb2, host_pb2_grpc
from tests.backup.conftest import Mysqld

pytestmark = [pytest.mark.slow, pytest.mark.root]


# ---------------------------------------------------------------- streams taken apart and put together

@dataclass
class Chunk:
    kind: int
    path: bytes
    payload: bytes = b""
    offset: int = 0
    raw_meta: bytes = b""


def unpack(zst: bytes) -> list[Chunk]:
    raw = subprocess.run(["zstd", "-q", "-d", "-c"], input=zst, capture_output=True, check=True).stdout
    out, pos = [], 0
    while pos < len(raw):
        kind, n = raw[pos + 9], int.from_bytes(raw[pos + 10:pos + 14], "little")
        path = raw[pos + 14:pos + 14 + n]
        pos += 14 + n
        if kind == xbstream.CHUNK_EOF:
            out.append(Chunk(kind, path))
            continue
        length, offset = int.from_bytes(raw[pos:pos + 8], "little"), int.from_bytes(raw[pos + 8:pos + 16], "little")
        pos += 20
        out.append(Chunk(kind, path, raw[pos:pos + length], offset))
        pos += length
    return out


def pack(chunks: list[Chunk]) -> bytes:
    import zlib
    raw = bytearray()
    for c in chunks:
        raw += xbstream.MAGIC + bytes([0, c.kind]) + len(c.path).to_bytes(4, "little") + c.path
        if c.kind == xbstream.CHUNK_PAYLOAD:
            raw += len(c.payload).to_bytes(8, "little") + c.offset.to_bytes(8, "little")
            raw += (zlib.crc32(c.payload) & 0xFFFFFFFF).to_bytes(4, "little") + c.payload
    return subprocess.run(["zstd", "-q", "-c"], input=bytes(raw), capture_output=True, check=True).stdout


def add_file(chunks: list[Chunk], path: str, data: bytes) -> list[Chunk]:
    p = path.encode()
    return [Chunk(xbstream.CHUNK_PAYLOAD, p, data, 0), Chunk(xbstream.CHUNK_EOF, p), *chunks]


def with_cnf(chunks: list[Chunk], extra: str) -> list[Chunk]:
    out = []
    for c in chunks:
        if c.path == b"backup-my.cnf" and c.kind == xbstream.CHUNK_PAYLOAD:
            c = Chunk(c.kind, c.path, c.payload + extra.encode(), 0)
        out.append(c)
    return out


@dataclass
class Taken:
    zst: bytes
    checksums: dict[str, int]


@pytest.fixture(scope="module")
def taken() -> Iterator[Taken]:
    """One real full backup of a mariadbd with InnoDB, MyISAM and Aria tables, and its checksums."""
    base = tempfile.mkdtemp(prefix="reddwarf-test-hostile-")
    m = Mysqld(base)
    try:
        m.start_sync()
        conn = m.connect()
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE shop")
            for engine in ("InnoDB", "MyISAM", "Aria"):
                cur.execute(f"CREATE TABLE shop.t_{engine} (id INT PRIMARY KEY, note VARCHAR(100)) ENGINE={engine}")
                cur.executemany(f"INSERT INTO shop.t_{engine} VALUES (%s, %s)", [(i, f"row {i}") for i in range(300)])
        conn.close()
        runner = BackupRunner(MysqlAccess(socket=m.socket, user="root", password="", datadir=m.datadir),
                              m.stop, m.start)
        got = bytearray()

        async def upload(chunks: AsyncIterator[agent_pb2.BackupChunk]) -> agent_pb2.UploadBackupResponse:
            async for c in chunks:
                got.extend(c.data)
            return agent_pb2.UploadBackupResponse(size_bytes=len(got), sha256=hashlib.sha256(got).hexdigest())

        async def progress(percent: int, message: str, done: int) -> None:
            return None

        async def take() -> dict[str, int]:
            await runner.backup("b1", "", upload, progress)
            return {c.table: c.checksum for c in await runner.table_checksums()}
        sums = asyncio.run(take())
        yield Taken(bytes(got), sums)
    finally:
        m.stop_sync()
        subprocess.run(["rm", "-rf", base], check=False)


# ---------------------------------------------------------------- the server's proof restore, for real

class _NoRows:
    def __enter__(self) -> _NoRows:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get(self, *args: object) -> None:
        return None


class _App:
    def __init__(self, state_dir: str) -> None:
        self.settings = Settings(state_dir=state_dir)

    def sessions(self) -> _NoRows:
        return _NoRows()


class _Store:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    async def open_reader(self, backup_id: str) -> AsyncIterator[bytes]:
        yield self.objects[backup_id]


def server_with_secrets(root: str) -> tuple[Backups, list[str]]:
    """A Backups of a server whose state dir holds a CA key, a KEK and a state DB, as a real one does."""
    state = os.path.join(root, "state")
    secrets = [os.path.join(state, "pki", "ca.key"), os.path.join(state, "backup-kek.key"),
               os.path.join(state, "state.db"), os.path.join(state, "admin.token")]
    for path in secrets:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "w") as f:
            f.write("SECRET\n")
        os.chmod(path, 0o600)
    return Backups(_App(state), _Store({}), None), secrets  # type: ignore[arg-type]


async def prove(backups: Backups, zst: bytes, expected: dict[str, int] | None) -> dict[str, Any]:
    bid = str(uuid.uuid4())
    backups.store = _Store({bid: zst})  # type: ignore[assignment]
    return await backups._restore_in_scratch([(bid, hashlib.sha256(zst).hexdigest())], expected)


def _ppid_argv(pid: int) -> tuple[int, list[str]] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return ppid, [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (OSError, ValueError, IndexError):
        return None


def _details(pid: int, argv: list[str]) -> dict[str, Any] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        netns = os.readlink(f"/proc/{pid}/ns/net")
        userns = os.readlink(f"/proc/{pid}/ns/user")
        with open(f"/proc/{pid}/cgroup") as f:
            cgroups = {c: path for _, ctrls, path in (ln.rstrip("\n").split(":", 2) for ln in f) for c in ctrls.split(",")}
        memory_limit = 0
        with contextlib.suppress(OSError, KeyError, ValueError):
            with open(f"/sys/fs/cgroup/memory{cgroups['memory']}/memory.limit_in_bytes") as f:
                memory_limit = int(f.read())
        listening = []
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
                listening += [line for line in f.readlines()[1:] if line.split()[3] == "0A"]
    except (OSError, ValueError):
        return None
    return {"pid": pid, "uid": [int(x) for x in status["Uid"].split()], "name": status["Name"], "argv": argv,
            "netns": netns, "userns": userns,
            "cgroups": cgroups, "memory_limit": memory_limit, "listening": listening}


def sandbox_processes(marker: str) -> list[dict[str, Any]]:
    """The processes started for our proof: unshare and the sandbox (argv names our state dir) and all
    their descendants."""
    procs = {int(d): x for d in os.listdir("/proc") if d.isdigit() and (x := _ppid_argv(int(d))) is not None}
    found = {pid for pid, (_, argv) in procs.items() if any(marker in a for a in argv)}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return [d for pid in found if (d := _details(pid, procs[pid][1])) is not None]


async def test_a_proof_restore_runs_as_the_sandbox_uid_without_network_and_gives_the_checksums(
        taken: Taken, tmp_path: Any) -> None:
    backups, _ = server_with_secrets(str(tmp_path))
    seen: dict[int, dict[str, Any]] = {}
    task = asyncio.create_task(prove(backups, taken.zst, taken.checksums))
    while not task.done():
        for p in sandbox_processes(str(tmp_path)):
            if p["name"] in ("mariadbd", "mariadb-backup") or any("reddwarf.agent.verify" in a for a in p["argv"]):
                seen.setdefault(p["pid"], p)
        await asyncio.sleep(0.02)
    result = task.result()
    assert result["ok"], result
    assert result["checksums"] == taken.checksums
    names = {p["name"] for p in seen.values()}
    assert "mariadbd" in names and "mariadb-backup" in names, names
    ours, our_users = os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/user")
    for p in seen.values():
        assert p["uid"] == [sandbox.SANDBOX_UID] * 4, p       # real, effective, saved, fs: never root
        assert p["netns"] != ours, p                            # not the server's network
        assert p["userns"] != our_users, p                      # in the sandbox's own id map
        if os.path.isdir("/sys/fs/cgroup/memory"):              # and inside its memory, cpu and pids limits
            groups = {p["cgroups"][c] for c in ("memory", "cpu", "pids")}
            assert len(groups) == 1 and groups.pop().startswith("/" + sandbox.CGROUP_PREFIX + "verify-"), p
            assert p["memory_limit"] == sandbox.Limits().memory_mb * 1024 * 1024, p
        assert p["listening"] == [], p                          # and no TCP listener in its own
        assert not any(a.startswith("--user") for a in p["argv"]), p
        assert not any("plugin-load" in a or "plugin_load" in a for a in p["argv"]), p
    assert not os.listdir(backups.scratch_dir()), "the staged chain is removed"


async def test_plugins_named_in_backup_my_cnf_are_never_loaded(taken: Taken, tmp_path: Any) -> None:
    hostile = pack(with_cnf(unpack(taken.zst), (
        "\nplugin_load_add=file_key_management\nfile_key_management_filename=/nonexistent/keys\n"
        "plugin_dir=/tmp/evil-plugins\ninnodb_data_home_dir=/etc\ninnodb_undo_directory=/etc\n"
        "[mariadb-backup]\nplugin-load=file_key_management\n")))
    # Teeth: the same stream prepared as it was before this sandbox loads the plugin and fails on it.
    raw = tmp_path / "raw"
    raw.mkdir()
    subprocess.run(f"zstd -q -d -c | mbstream -x -C {raw}", input=hostile, shell=True, check=True)
    before = subprocess.run(["mariadb-backup", "--prepare", f"--target-dir={raw}"], capture_output=True, text=True)
    assert before.returncode != 0 and "file_key_management" in before.stderr, before.stderr[-2000:]

    backups, _ = server_with_secrets(str(tmp_path))
    result = await prove(backups, hostile, taken.checksums)
    assert result["ok"], result
    assert result["checksums"] == taken.checksums


def test_backup_my_cnf_is_rebuilt_from_the_allowlist() -> None:
    text = ("[mysqld]\ninnodb_checksum_algorithm=full_crc32\ninnodb_data_file_path=ibdata1:12M:autoextend\n"
            "innodb_log_file_size=100663296\ninnodb_page_size=16384\ninnodb_undo_directory=./\n"
            "plugin_load_add=evil\nplugin-load=evil\nplugin_dir=/tmp\ninnodb_data_home_dir=/etc\n"
            "innodb_undo_directory=/etc\ninnodb_data_file_path=/etc/passwd:12M\n!include /etc/shadow\n"
            "[mariadb-backup]\ninnodb_page_size=4096\n")
    out = xbstream.sanitize_cnf(text)
    assert "plugin" not in out and "/etc" not in out and "include" not in out and "4096" not in out
    for line in ("innodb_checksum_algorithm=full_crc32", "innodb_data_file_path=ibdata1:12M:autoextend",
                 "innodb_log_file_size=100663296", "innodb_page_size=16384", "innodb_undo_directory=./"):
        assert line in out.splitlines()


HOSTILE_NAMES = ["../../../../../../../../tmp/reddwarf-hostile-{tag}", "/tmp/reddwarf-hostile-{tag}",
                 "evil.so", "shop/evil.so", "shop/t.isl", "shop/../../reddwarf-hostile-{tag}",
                 "a/b/c.ibd", "shop/.hidden.ibd", "mysql/plugin.MRG"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_a_stream_with_an_unexpected_file_is_refused_in_the_proof(taken: Taken, tmp_path: Any,
                                                                        name: str) -> None:
    tag = uuid.uuid4().hex
    name = name.format(tag=tag)
    hostile = pack(add_file(unpack(taken.zst), name, b"#!/bin/sh\necho owned\n"))
    backups, _ = server_with_secrets(str(tmp_path))
    result = await prove(backups, hostile, taken.checksums)
    assert not result["ok"]
    assert result["detail"].startswith("restore refused: the backup stream holds an unexpected file"), result
    assert not os.path.exists(f"/tmp/reddwarf-hostile-{tag}")
    assert not os.listdir(backups.scratch_dir())


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_the_guest_restore_refuses_the_same_files_before_mbstream_writes_them(
        taken: Taken, tmp_path: Any, name: str) -> None:
    tag = uuid.uuid4().hex
    name = name.format(tag=tag)
    archive = tmp_path / "a.xbstream.zst"
    archive.write_bytes(pack(add_file(unpack(taken.zst), name, b"x")))
    runner = BackupRunner(MysqlAccess(socket="", user="", password="", datadir=str(tmp_path / "data")),
                          _never, _never, BackupSettings())
    dest = tmp_path / "work" / "x000"
    with pytest.raises(xbstream.BackupRefused, match="unexpected file"):
        await runner._extract(str(archive), str(dest), str(tmp_path))
    assert not os.path.exists(f"/tmp/reddwarf-hostile-{tag}")
    assert not (tmp_path / f"reddwarf-hostile-{tag}").exists() and not (tmp_path / "evil.so").exists()
    assert sorted(os.listdir(tmp_path / "work")) == ["x000"], "nothing beside the extraction dir"


async def _never() -> None:
    raise AssertionError("mysqld is not touched by an extraction")


def test_the_unpacked_tree_may_hold_no_link_device_or_deep_file(tmp_path: Any) -> None:
    (tmp_path / "ibdata1").write_bytes(b"x")
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "t.ibd").write_bytes(b"x")
    xbstream.check_tree(str(tmp_path))
    (tmp_path / "shop" / "link.ibd").symlink_to("/etc/shadow")
    with pytest.raises(xbstream.BackupRefused):
        xbstream.check_tree(str(tmp_path))
    (tmp_path / "shop" / "link.ibd").unlink()
    os.mkfifo(tmp_path / "xtrabackup_info")
    with pytest.raises(xbstream.BackupRefused):
        xbstream.check_tree(str(tmp_path))


async def test_oversized_unpacking_is_refused(taken: Taken, tmp_path: Any) -> None:
    archive = tmp_path / "a.xbstream.zst"
    archive.write_bytes(taken.zst)
    runner = BackupRunner(MysqlAccess(socket="", user="", password="", datadir=str(tmp_path / "data")),
                          _never, _never, BackupSettings(max_extract_bytes=1 << 20))
    with pytest.raises(xbstream.BackupRefused, match="more than"):
        await runner._extract(str(archive), str(tmp_path / "x000"), str(tmp_path))


# ---------------------------------------------------------------- a look from inside the sandbox

async def test_from_inside_the_sandbox_the_server_secrets_cannot_be_read(tmp_path: Any) -> None:
    backups, secrets = server_with_secrets(str(tmp_path))
    state = backups.app.settings.state_dir
    stage = tempfile.mkdtemp(prefix="probe-", dir=backups.scratch_dir())
    look = [*secrets, state, os.path.join(state, "pki"), "/etc/shadow", "/root"]
    try:
        done, _ = await sandbox.launch(stage, {"uid": sandbox.SANDBOX_UID, "hide": backups.secret_paths(),
                                               "probe": {"paths": look}}, sandbox.Limits(), 60)
    finally:
        subprocess.run(["rm", "-rf", stage], check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Inside its user namespace it is INNER_UID, which the host knows as SANDBOX_UID; root there is not ours.
    assert seen["uid"] == seen["euid"] == seen["gid"] == sandbox.INNER_UID and seen["groups"] == []
    assert seen["uid_map"] == seen["gid_map"] == [["0", str(sandbox.IDMAP_BASE), str(sandbox.IDMAP_SIZE)]]
    assert int(seen["cap_eff"], 16) == 0 and int(seen["cap_bnd"], 16) == 0 and seen["no_new_privs"] == "1"
    assert seen["interfaces"] == ["lo"]
    readable = seen["readable"]
    assert all(readable[p] is False for p in look if p != "/root"), readable
    # /root is an empty tmpfs, but for an interpreter installed under it, put back read-only.
    kept = {os.path.relpath(os.path.realpath(sys.base_prefix), "/root").split("/")[0]}
    assert readable["/root"] is False or set(readable["/root"]) <= kept, readable
    assert not any(seen["writable"].values()), seen["writable"]
    for path in secrets:  # still there for the server itself
        with open(path) as f:
            assert f.read() == "SECRET\n"


@pytest.mark.parametrize("line", ['not json', '{"ok": true}', '{"ok": "yes", "detail": "", "checksums": {}}',
                                  '{"ok": true, "detail": "", "checksums": {"t": "1"}}',
                                  '{"ok": true, "detail": "", "checksums": {"t": true}}'])
def test_a_result_of_the_wrong_shape_from_the_sandbox_is_a_failed_proof(line: str) -> None:
    out = sandbox.proof_result(line)
    assert out["ok"] is False and out["checksums"] == {} and "no readable result" in out["detail"]


def test_a_sandbox_left_by_a_killed_server_is_killed_and_removed_at_start(tmp_path: Any) -> None:
    backups, _ = server_with_secrets(str(tmp_path))
    stage = tempfile.mkdtemp(prefix="verify-", dir=backups.scratch_dir())
    # What a killed server leaves: a process naming the staging dir (unshare, the sandbox's pid 1).
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", f"--origin={stage}"])
    try:
        for _ in range(500):  # until it has exec'd (before that its cmdline is ours)
            with open(f"/proc/{left.pid}/cmdline", "rb") as f:
                if b"--origin=" in f.read():
                    break
            time.sleep(0.01)
        backups.clear_scratch()
        assert left.wait(10) == -9
        assert not os.path.exists(backups.scratch_dir(create=False))
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


# ---------------------------------------------------------------- the same proof on a host, over mTLS

@pytest.fixture(scope="module")
def hostd(tmp_path_factory: Any, pki: Any) -> Iterator[Any]:
    from tests.fixtures.hostd import start_hostd
    root = tmp_path_factory.mktemp("hostd")
    with start_hostd(root, pki.files("host", "h-prove"), host_id="h-prove", agent_init_cmd="/bin/sleep 3600",
                     crl_path=pki.ca.dir / "crl.pem") as h:
        yield h


def prove_requests(zst: bytes, expected: dict[str, int] | None) -> Iterator[host_pb2.ProveBackupChunk]:
    spec = host_pb2.ProveBackupSpec(backup_ids=["b1"], sha256s=[hashlib.sha256(zst).hexdigest()],
                                    compare=expected is not None, expected=expected or {})
    yield host_pb2.ProveBackupChunk(spec=spec)
    for i in range(0, len(zst), 1 << 20):
        yield host_pb2.ProveBackupChunk(link=0, data=zst[i:i + (1 << 20)])


@pytest.mark.parametrize("role", ["instance", "host", "admin"])
def test_only_the_control_server_may_prove_a_backup_on_a_host(hostd: Any, pki: Any, taken: Taken, role: str) -> None:
    with hostd.channel(pki.files(role, "x")) as ch, pytest.raises(grpc.RpcError) as e:
        host_pb2_grpc.HostAgentStub(ch).ProveBackup(prove_requests(taken.zst, None), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_host_proves_a_clean_backup_and_refuses_a_hostile_one(hostd: Any, pki: Any, taken: Taken) -> None:
    with hostd.channel(pki.files("server", "control")) as ch:
        stub = host_pb2_grpc.HostAgentStub(ch)
        good = stub.ProveBackup(prove_requests(taken.zst, taken.checksums), timeout=300)
        assert good.ok, good.detail
        assert dict(good.checksums) == taken.checksums
        evil = pack(with_cnf(add_file(unpack(taken.zst), "shop/evil.so", b"\x7fELF"), "\nplugin_load_add=x\n"))
        bad = stub.ProveBackup(prove_requests(evil, taken.checksums), timeout=300)
        assert not bad.ok and bad.detail.startswith("restore refused: the backup stream holds an unexpected file")
        with pytest.raises(grpc.RpcError) as e:  # links out of order / a stream without its spec
            stub.ProveBackup(iter([host_pb2.ProveBackupChunk(link=0, data=b"x")]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    scratch = hostd.root / "state" / "scratch"
    assert not scratch.exists() or not os.listdir(scratch), "hostd removes every staged chain"
