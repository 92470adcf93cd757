"""Admin.EnrollHost: makes a machine a Red Dwarf host over SSH (paramiko), the blueprint's FirstBoot idea
applied to hosts. Named steps, each safe to run again, so enrolling a host twice changes nothing:

  connect       the host key must match the fingerprint the admin gave (no trust on first use)
  check_python  the host's python3 is 3.11 or newer
  upload        the wheelhouse (server/wheelhouse.py) over SFTP into <install>/wheels (only what differs)
  install       a venv, `pip install --no-index` from those wheels (skipped when this very set is installed)
  certificate   the host makes its key and CSR (`reddwarf-hostd csr`; the key never leaves the host), the CA
                signs it for host/<id>; the CA certificate and the CRL go next to it
  start         hostd under systemd (a unit per host id) where the host runs systemd, else under
                `reddwarf-hostd supervise`; restarted if it ran
  wait          hostd answers GetCapacity over mTLS as exactly host/<id>
  register      the host row with that capacity

Where the SSH key lives: the admin's CLI reads its key file and sends the key over the admin's mTLS
channel; the server holds it in memory for this one call and never logs or stores it (an operator may
instead give a path on the server, `ssh_key_path`, e.g. a deploy key). Nothing secret goes on a command
line, and each remote command is an argv list quoted with shlex, never a shell string built from input.

Any failure before `register` leaves nothing behind on a host that was not registered: hostd stopped, its
unit removed, the install directory deleted, the certificate revoked. A registered host (a re-enrollment)
keeps what it had."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shlex
import stat
import time
from pathlib import Path

import grpc
import paramiko

from reddwarf.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    RedDwarfError,
    Unavailable,
)
from reddwarf.common.states import HostState
from reddwarf.common.tls import aio_channel, host_peer
from reddwarf.v1 import admin_pb2, host_pb2, host_pb2_grpc

from . import models
from .app import App
from .hosts import record_capacity
from .wheelhouse import Wheelhouse

log = logging.getLogger("reddwarf.server.host_enrollment")

HOST_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}\Z")
FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}\Z")
TARGET = re.compile(r"^(?P<user>[A-Za-z_][A-Za-z0-9_.-]{0,31})@(?P<addr>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)"
                    r"(?::(?P<port>\d{1,5}))?\Z")
# Host key kinds (as PKey.get_name() names them) and the algorithms that negotiate each.
HOST_KEY_KINDS = {"ssh-ed25519": ("ssh-ed25519",), "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
                  "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",), "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
                  "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}
HOST_KEY_ALGORITHMS = tuple(a for algs in HOST_KEY_KINDS.values() for a in algs)
COMMAND_TIMEOUT = 600.0
MIN_PYTHON = (3, 11)


def fingerprint(key: paramiko.PKey) -> str:
    """As `ssh-keygen -lf` prints it: SHA256 of the public key blob, unpadded base64."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class HostKeyMismatch(paramiko.SSHException):
    def __init__(self, kind: str, offered: str) -> None:
        super().__init__(offered)
        self.kind = kind
        self.offered = offered


class PinnedHostKey(paramiko.MissingHostKeyPolicy):
    """Accepts exactly the host key whose fingerprint the admin gave; anything else ends the handshake."""

    def __init__(self, expected: str) -> None:
        self.expected = expected

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        got = fingerprint(key)
        if not hmac.compare_digest(got.encode(), self.expected.encode()):
            raise HostKeyMismatch(key.get_name(), f"{key.get_name()} {got}")


@dataclasses.dataclass(frozen=True)
class Target:
    user: str
    address: str      # as it goes in a gRPC address ("[v6]" bracketed)
    port: int

    @property
    def host(self) -> str:
        return self.address.strip("[]")


@dataclasses.dataclass(frozen=True)
class Request:
    """An EnrollHostRequest, checked. The secrets are kept out of repr (and so out of any log line)."""

    host_id: str
    target: Target
    host_key: str
    hostd_port: int
    private_key: bytes = dataclasses.field(repr=False)
    key_path: str
    password: str = dataclasses.field(repr=False)

    @property
    def hostd_address(self) -> str:
        return f"{self.target.address}:{self.hostd_port}"


def parse_request(req: admin_pb2.EnrollHostRequest, default_port: int) -> Request:
    if not HOST_ID.match(req.id):
        raise InvalidArgument("id must be 1-64 lowercase letters, digits or '-'", field="id")
    m = TARGET.match(req.ssh_target)
    if not m:
        raise InvalidArgument("ssh_target must be user@address or user@address:port", field="ssh_target")
    port = int(m["port"] or 22)
    if not 0 < port < 65536:
        raise InvalidArgument("ssh_target's port must be 1-65535", field="ssh_target")
    if not FINGERPRINT.match(req.host_key):
        raise InvalidArgument("host_key must be the host key's SHA256 fingerprint as ssh-keygen -lf prints it "
                              "(SHA256: and 43 base64 characters)", field="host_key")
    hostd_port = req.hostd_port or default_port
    if not 0 < hostd_port < 65536:
        raise InvalidArgument("hostd_port must be 1-65535", field="hostd_port")
    if not (req.ssh_private_key or req.ssh_key_path or req.ssh_password):
        raise InvalidArgument("give ssh_private_key, ssh_key_path or ssh_password to log in with",
                              field="ssh_private_key")
    if req.ssh_key_path and not os.path.isabs(req.ssh_key_path):
        raise InvalidArgument("ssh_key_path must be an absolute path on the server", field="ssh_key_path")
    if len(req.ssh_private_key) > 64 * 1024:
        raise InvalidArgument("ssh_private_key is larger than 64 KiB", field="ssh_private_key")
    return Request(req.id, Target(m["user"], m["addr"], port), req.host_key, hostd_port, req.ssh_private_key,
                   req.ssh_key_path, req.ssh_password)


def load_private_key(data: bytes, passphrase: str, field: str) -> paramiko.PKey:
    text = data.decode(errors="replace")
    encrypted = False
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text), password=passphrase or None)
        except paramiko.PasswordRequiredException:
            encrypted = True
        except (paramiko.SSHException, ValueError, TypeError, IndexError):
            continue
    if encrypted and not passphrase:
        raise InvalidArgument("the private key is encrypted: give its passphrase (ssh_password)", field="ssh_password")
    if passphrase and ("ENCRYPTED" in text or "aes" in text or _openssh_encrypted(text)):
        raise PermissionDenied("the passphrase does not decrypt the private key (wrong password)",
                               field="ssh_password")
    raise InvalidArgument(f"{field} is not a private key paramiko can read (OpenSSH or PEM; Ed25519, ECDSA or RSA)",
                          field=field)


def _openssh_encrypted(text: str) -> bool:
    body = "".join(ln for ln in text.splitlines() if ln and not ln.startswith("-----"))
    try:
        raw = base64.b64decode(body)
    except ValueError:
        return False
    return raw.startswith(b"openssh-key-v1\0") and b"bcrypt" in raw[:80]


class Remote:
    """One SSH session to the host: commands as quoted argv lists, files over SFTP."""

    def __init__(self, client: paramiko.SSHClient, target: Target) -> None:
        self.client = client
        self.target = target
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def run(self, argv: list[str], timeout: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise Unavailable(f"the SSH connection to {self.target.host} was lost", field="ssh_target")
        chan = transport.open_session(timeout=30)
        try:
            chan.exec_command(shlex.join(argv))
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                busy = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    busy = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    busy = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"{argv[0]} on {self.target.host} did not finish in {timeout:.0f}s",
                                           field="ssh_target")
                if not busy:
                    time.sleep(0.01)
            return chan.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            chan.close()

    def check(self, argv: list[str], what: str, timeout: float = COMMAND_TIMEOUT) -> str:
        rc, out, err = self.run(argv, timeout)
        if rc != 0:
            tail = (err.strip() or out.strip())[-800:]
            raise FailedPrecondition(f"{what} on {self.target.host} failed (exit {rc}): {tail}", field="ssh_target")
        return out

    def read(self, path: str) -> bytes | None:
        try:
            with self.sftp.open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Whole or not at all: a temporary file renamed over the old one."""
        tmp = f"{path}.tmp"
        with self.sftp.open(tmp, "wb") as f:
            f.write(data)
        self.sftp.chmod(tmp, mode)
        self.sftp.posix_rename(tmp, path)

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()


class Layout:
    """Where things go on the host."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.venv = f"{root}/venv"
        self.hostd = f"{root}/venv/bin/reddwarf-hostd"
        self.wheels = f"{root}/wheels"
        self.tls = f"{root}/tls"
        self.cert = f"{root}/tls/hostd.pem"
        self.key = f"{root}/tls/hostd.key"
        self.ca = f"{root}/tls/ca.pem"
        self.crl = f"{root}/tls/crl.pem"
        self.config = f"{root}/hostd.json"
        self.pid = f"{root}/hostd.pid"
        self.log = f"{root}/hostd.log"
        self.digest = f"{root}/installed.digest"


class HostEnroller:
    def __init__(self, app: App) -> None:
        self.app = app
        s = app.settings
        self.wheelhouse = Wheelhouse(s.enroll_wheelhouse, s.enroll_source_dir or None)
        self._locks: dict[str, asyncio.Lock] = {}

    async def enroll(self, req: admin_pb2.EnrollHostRequest) -> str:
        """Enrolls and registers the host; returns its id. Raises domain errors naming the cause."""
        r = parse_request(req, self.app.settings.enroll_hostd_port)
        lock = self._locks.setdefault(r.host_id, asyncio.Lock())
        async with lock:
            registered = self._check_registration(r)
            started = time.monotonic()
            log.info("enrolling host", extra={"host": r.host_id, "target": f"{r.target.user}@{r.target.host}",
                                              "port": r.target.port, "reenroll": registered})
            steps: dict[str, float] = {}   # seconds per step, for the log line
            mark = time.monotonic()

            def done(step: str) -> None:
                nonlocal mark
                steps[step], mark = round(time.monotonic() - mark, 2), time.monotonic()

            wheels = await asyncio.to_thread(self.wheelhouse.ensure)
            done("wheelhouse")
            remote = await asyncio.to_thread(self._connect, r)
            done("connect")
            layout = Layout(self.app.settings.enroll_install_dir.replace("{host}", r.host_id))
            try:
                await asyncio.to_thread(self._install, remote, r, layout, wheels)
                done("install_and_start")
                cap = await self._wait_for_hostd(remote, r, layout)
                done("wait")
                self._register(r, cap)
            except BaseException as exc:
                if not registered:
                    await asyncio.to_thread(self._roll_back, remote, r, layout)
                log.warning("host enrollment failed", extra={"host": r.host_id, "error": str(exc)[:300]})
                raise
            finally:
                await asyncio.to_thread(remote.close)
            log.info("host enrolled", extra={"host": r.host_id, "address": r.hostd_address,
                                             "seconds": round(time.monotonic() - started, 2),
                                             "steps": json.dumps(steps)})
            return r.host_id

    # -- steps -----------------------------------------------------------------------------------
    def _check_registration(self, r: Request) -> bool:
        with self.app.sessions() as s:
            row = s.get(models.Host, r.host_id)
            if row is None:
                return False
            if row.address != r.hostd_address:
                raise AlreadyExists(f"host {r.host_id!r} is registered at {row.address}, not {r.hostd_address}; "
                                    "delete it first or choose another id", field="id")
            return True

    def _connect(self, r: Request) -> Remote:
        pkey: paramiko.PKey | None = None
        if r.private_key:
            pkey = load_private_key(r.private_key, r.password, "ssh_private_key")
        elif r.key_path:
            try:
                data = Path(r.key_path).read_bytes()
            except OSError as e:
                raise FailedPrecondition(f"ssh_key_path {r.key_path} cannot be read on the server: {e.strerror}",
                                         field="ssh_key_path") from None
            pkey = load_private_key(data, r.password, "ssh_key_path")
        timeout = self.app.settings.enroll_connect_timeout_seconds
        # Try the key type the host negotiates first; if the admin gave the fingerprint of another of its
        # keys, ask for each other type in turn (paramiko compares one key per handshake).
        offered: dict[str, str] = {}
        for kind in (None, *HOST_KEY_KINDS):
            if kind is not None and kind in offered:
                continue
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(PinnedHostKey(r.host_key))
            disabled = {} if kind is None else {"keys": [a for a in HOST_KEY_ALGORITHMS
                                                         if a not in HOST_KEY_KINDS[kind]]}
            try:
                client.connect(r.target.host, r.target.port, username=r.target.user, pkey=pkey,
                               password=None if pkey else r.password, timeout=timeout, banner_timeout=timeout,
                               auth_timeout=timeout, allow_agent=False, look_for_keys=False,
                               disabled_algorithms=disabled)
                return Remote(client, r.target)
            except HostKeyMismatch as e:
                client.close()
                offered[e.kind] = e.offered
                continue
            except paramiko.AuthenticationException:
                client.close()
                field = "ssh_password" if pkey is None else ("ssh_private_key" if r.private_key else "ssh_key_path")
                what = "the password" if pkey is None else "the key"
                raise PermissionDenied(f"{r.target.user}@{r.target.host}:{r.target.port} refused {what} "
                                       "(SSH authentication failed)", field=field) from None
            except TimeoutError:
                client.close()
                raise Unavailable(f"{r.target.host}:{r.target.port} is unreachable: no answer within {timeout:.0f}s",
                                  field="ssh_target") from None
            except paramiko.ssh_exception.NoValidConnectionsError as e:
                client.close()
                reasons = "; ".join(sorted({x.strerror if isinstance(x, OSError) and x.strerror else str(x)
                                            for x in e.errors.values()}))
                raise Unavailable(f"{r.target.host}:{r.target.port} is unreachable: {reasons}",
                                  field="ssh_target") from None
            except paramiko.SSHException as e:
                client.close()
                if kind is not None and "Incompatible" in str(e):
                    continue  # the host has no key of this type
                if "banner" in str(e):
                    raise Unavailable(f"{r.target.host}:{r.target.port} accepted the connection but sent no SSH "
                                      f"banner within {timeout:.0f}s (not an SSH server there?)",
                                      field="ssh_target") from None
                raise Unavailable(f"the SSH handshake with {r.target.host}:{r.target.port} failed: {e}",
                                  field="ssh_target") from None
            except OSError as e:
                client.close()
                raise Unavailable(f"{r.target.host}:{r.target.port} is unreachable: {e.strerror or e}",
                                  field="ssh_target") from None
        raise FailedPrecondition(f"the host key of {r.target.host}:{r.target.port} does not match {r.host_key} "
                                 f"(it offered {', '.join(offered.values()) or 'none we could compare'}); refusing to "
                                 "connect", field="host_key")

    def _install(self, remote: Remote, r: Request, layout: Layout, wheels: list[Path]) -> None:
        """Every remote step up to a started hostd."""
        py = self.app.settings.enroll_python
        code = ("import sys, venv; print('%d.%d' % sys.version_info[:2]); "
                f"sys.exit(0 if sys.version_info >= {MIN_PYTHON!r} else 3)")
        rc, out, err = remote.run([py, "-c", code], timeout=60)
        if rc == 127:
            raise FailedPrecondition(f"{r.target.host} has no {py} (command not found); install Python "
                                     f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer with its venv module",
                                     field="ssh_target")
        if rc == 3:
            raise FailedPrecondition(f"{r.target.host} has Python {out.strip()}; hostd needs "
                                     f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer", field="ssh_target")
        if rc != 0:
            raise FailedPrecondition(f"{py} on {r.target.host} cannot make a venv: {(err or out).strip()[-400:]}",
                                     field="ssh_target")
        remote.check(["mkdir", "-p", layout.wheels, layout.tls], "creating the install directory")
        remote.check(["chmod", "700", layout.tls], "protecting the TLS directory")
        self._upload_wheels(remote, layout, wheels)
        digest = Wheelhouse.digest(wheels)
        if remote.read(layout.digest) != digest.encode() or remote.run(["test", "-x", layout.hostd])[0] != 0:
            remote.check(["rm", "-rf", layout.venv], "removing the old venv")
            remote.check([py, "-m", "venv", layout.venv], "creating hostd's venv")
            # --no-compile: byte-compiling every dependency doubled the install; hostd (root) writes the
            # bytecode of what it imports on its first start.
            remote.check([f"{layout.venv}/bin/python", "-m", "pip", "install", "-q", "--no-index", "--no-compile",
                          "--disable-pip-version-check", "--find-links", layout.wheels, "reddwarf"],
                         "installing hostd from the wheels")
            remote.write(layout.digest, digest.encode())
        csr = remote.check([layout.hostd, "csr", "--key-path", layout.key, "--host-id", r.host_id],
                           "making the host's key and CSR")
        self._sign(remote, r, layout, csr.encode())
        remote.write(layout.config, json.dumps(self._hostd_config(r, layout), indent=2).encode(), 0o644)
        self._start(remote, r, layout)

    def _upload_wheels(self, remote: Remote, layout: Layout, wheels: list[Path]) -> None:
        have = {a.filename: a.st_size for a in remote.sftp.listdir_attr(layout.wheels)
                if a.st_mode is not None and stat.S_ISREG(a.st_mode)}
        for w in wheels:
            if have.get(w.name) != w.stat().st_size:
                remote.sftp.put(str(w), f"{layout.wheels}/{w.name}.part")
                remote.sftp.posix_rename(f"{layout.wheels}/{w.name}.part", f"{layout.wheels}/{w.name}")
        wanted = {w.name for w in wheels}
        for name in have:
            if name not in wanted:  # an older reddwarf wheel: pip must not pick between two
                remote.sftp.remove(f"{layout.wheels}/{name}")

    def _sign(self, remote: Remote, r: Request, layout: Layout, csr: bytes) -> None:
        from .admin import record_certificate
        try:
            issued = self.app.ca.sign_csr(csr, "host", r.host_id, days=self.app.settings.host_cert_days)
        except RedDwarfError as e:
            raise FailedPrecondition(f"the host's CSR was refused: {e.message}", field="ssh_target") from None
        with self.app.sessions() as s, s.begin():
            record_certificate(s, issued.cert_pem, issued.not_after)
        remote.write(layout.ca, self.app.ca.cert_pem)
        remote.write(layout.crl, self.app.ca.crl_pem())
        remote.write(layout.cert, issued.cert_pem)

    def _hostd_config(self, r: Request, layout: Layout) -> dict[str, object]:
        extra: dict[str, object] = {}
        if self.app.settings.enroll_hostd_config:
            extra = json.loads(Path(self.app.settings.enroll_hostd_config).read_text())
        subst = {"{host}": r.host_id, "{install_dir}": layout.root}
        for k, v in list(extra.items()):
            if isinstance(v, str):
                for a, b in subst.items():
                    v = v.replace(a, b)
                extra[k] = v
        listen = "[::]" if r.target.address.startswith("[") else "0.0.0.0"
        return {**extra, "host_id": r.host_id, "listen_address": f"{listen}:{r.hostd_port}",
                "cert_path": layout.cert, "key_path": layout.key, "ca_path": layout.ca, "crl_path": layout.crl}

    @staticmethod
    def unit_name(host_id: str) -> str:
        return f"reddwarf-hostd-{host_id}.service"

    def _start(self, remote: Remote, r: Request, layout: Layout) -> None:
        if remote.run(["test", "-d", "/run/systemd/system"])[0] == 0:
            unit = self.unit_name(r.host_id)
            # KillMode=process: containers outlive a hostd restart (hostd is the control plane only).
            text = (f"[Unit]\nDescription=Red Dwarf host daemon ({r.host_id})\nAfter=network-online.target\n\n"
                    f"[Service]\nExecStart={shlex.join([layout.hostd, 'serve', '--config', layout.config])}\n"
                    "Restart=always\nRestartSec=2\nKillMode=process\n\n[Install]\nWantedBy=multi-user.target\n")
            remote.write(f"/etc/systemd/system/{unit}", text.encode())
            remote.check(["systemctl", "daemon-reload"], "reloading systemd")
            remote.check(["systemctl", "enable", unit], "enabling hostd's unit")
            remote.check(["systemctl", "restart", unit], "starting hostd")
        else:
            remote.check([layout.hostd, "supervise", "--config", layout.config, "--pid-file", layout.pid,
                          "--log-file", layout.log], "starting hostd under its supervisor", timeout=60)

    def _log_tail(self, remote: Remote, r: Request, layout: Layout) -> str:
        try:
            if remote.run(["test", "-d", "/run/systemd/system"])[0] == 0:
                return remote.run(["journalctl", "-u", self.unit_name(r.host_id), "-n", "20", "--no-pager"])[1]
            return (remote.read(layout.log) or b"").decode(errors="replace")[-1500:]
        except Exception:  # noqa: BLE001 - only for the error message
            return ""

    async def _wait_for_hostd(self, remote: Remote, r: Request, layout: Layout) -> host_pb2.Capacity:
        timeout = self.app.settings.enroll_ready_timeout_seconds
        deadline = time.monotonic() + timeout
        last = ""
        async with aio_channel(r.hostd_address, self.app.tls, peer=host_peer(r.host_id)) as ch:
            stub = host_pb2_grpc.HostAgentStub(ch)
            while True:
                try:
                    return await stub.GetCapacity(host_pb2.GetCapacityRequest(), timeout=5)
                except grpc.aio.AioRpcError as e:
                    last = f"{e.code().name}: {e.details()}"
                if time.monotonic() > deadline:
                    tail = await asyncio.to_thread(self._log_tail, remote, r, layout)
                    raise DeadlineExceeded(f"hostd on {r.hostd_address} did not answer over mTLS within "
                                           f"{timeout:.0f}s ({last}); its log ends: {tail.strip()[-800:]}",
                                           field="ssh_target")
                await asyncio.sleep(0.3)

    def _register(self, r: Request, cap: host_pb2.Capacity) -> None:
        s_ = self.app.settings
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Host, r.host_id)
            if row is not None and row.address != r.hostd_address:  # registered meanwhile by someone else
                raise AlreadyExists(f"host {r.host_id!r} is registered at {row.address}", field="id")
            if row is None:
                row = models.Host(id=r.host_id, address=r.hostd_address, state=HostState.UP,
                                  memory_overcommit=s_.memory_overcommit, storage_overcommit=s_.storage_overcommit)
                s.add(row)
            record_capacity(row, cap)

    def _roll_back(self, remote: Remote, r: Request, layout: Layout) -> None:
        """Undoes what a failed first enrollment did on the host (each part best effort, all attempted)."""
        try:
            if remote.run(["test", "-d", "/run/systemd/system"])[0] == 0:
                unit = self.unit_name(r.host_id)
                remote.run(["systemctl", "disable", "--now", unit], timeout=60)
                remote.run(["rm", "-f", f"/etc/systemd/system/{unit}"])
                remote.run(["systemctl", "daemon-reload"])
            elif remote.run(["test", "-x", layout.hostd])[0] == 0:
                remote.run([layout.hostd, "stop", "--pid-file", layout.pid], timeout=60)
            remote.run(["rm", "-rf", layout.root], timeout=120)
        except Exception as e:  # noqa: BLE001 - the original error is what the caller needs
            log.warning("enrollment roll-back incomplete", extra={"host": r.host_id, "error": str(e)[:200]})
        # Whatever certificate this attempt issued, wherever it failed: an unregistered host id holds no
        # certificate that should live.
        from .admin import revoke_identity
        with self.app.sessions() as s, s.begin():
            revoke_identity(self.app, s, f"spiffe://reddwarf/host/{r.host_id}", "enrollment failed")
