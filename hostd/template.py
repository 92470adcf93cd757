"""The OS template every container is snapshotted from: built once per recipe, cached, shared.

The template's name is a hash of its recipe (release, packages, the agent venv's pinned wheels), so a
changed recipe builds a new template beside the old one instead of silently reusing a stale one.
Building takes minutes (debootstrap from the cache, apt, an offline pip install); `reddwarf-hostd
build-template` runs it, and the LXC driver runs it on demand when the template is missing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata

from reddwarf.common import subids
from reddwarf.common.runner import CommandError, run

from . import idmap
from .settings import Settings

log = logging.getLogger("reddwarf.hostd.template")

RECIPE_VERSION = 1
RELEASE = "bookworm"
# memcached: the blueprint's second service in the container (CreateInstance services); bridge-mode guests
# cannot reach a mirror, so prepare must find it installed.
PACKAGES = ("python3", "python3-venv", "mariadb-server", "mariadb-backup", "zstd", "procps", "memcached")
# The Debian releases a template can be built from, with the Python their python3 is (the agent venv's wheels
# are fetched for it). bookworm: MariaDB 10.11, Python 3.11; trixie: MariaDB 11.8, Python 3.13.
RELEASES = {"bookworm": "3.11", "trixie": "3.13"}
# The packages whose exact versions the catalog shows (read from the template's dpkg status).
REPORTED_PACKAGES = ("mariadb-server", "mariadb-backup", "python3", "memcached")
# The agent's third-party dependencies, installed at the host venv's exact versions.
AGENT_DISTRIBUTIONS = ("grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "pymysql",
                       "cryptography", "pyyaml")
VENV = "/opt/reddwarf/venv"
READY_MARKER = "reddwarf-template.json"
# Unprivileged containers: container uid/gid 0..IDMAP_SIZE-1 are host uid/gid IDMAP_BASE.. (one range for
# every container of the host, like LXD without security.idmap.isolated). /etc/subuid and /etc/subgid
# record it for root.
IDMAP_BASE = 1_000_000
IDMAP_SIZE = 65536
SHIFTED_SUFFIX = f"-u{IDMAP_BASE}"


@dataclass(frozen=True)
class Recipe:
    release: str
    packages: tuple[str, ...]
    wheels: tuple[str, ...]  # "name==version"
    # Bumped by an operator to rebuild the same recipe with the distribution's newer packages: a new template
    # revision under a new name (revision 0 keeps the name every existing template was built under).
    revision: int = 0

    @property
    def digest(self) -> str:
        doc: dict[str, object] = {"v": RECIPE_VERSION, "release": self.release, "packages": self.packages,
                                  "wheels": self.wheels}
        if self.revision:
            doc["revision"] = self.revision
        text = json.dumps(doc, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"rdtpl-{self.digest}"


def current_recipe(release: str = RELEASE, revision: int = 0) -> Recipe:
    if release not in RELEASES:
        raise ValueError(f"release {release!r} is not one of {', '.join(RELEASES)}")
    wheels = tuple(f"{d}=={metadata.version(d)}" for d in AGENT_DISTRIBUTIONS)
    return Recipe(release=release, packages=PACKAGES, wheels=wheels, revision=revision)


def template_name(settings: Settings) -> str:
    return settings.template or current_recipe().name


def parse_release(requested: str) -> tuple[str, int] | None:
    """`trixie` or `trixie-r2` (release, revision), or None when `requested` names no release (a template's
    own name then)."""
    release, _, rev = requested.partition("-r")
    if release not in RELEASES or (rev and not rev.isdigit()) or (_ and not rev):
        return None
    return release, int(rev or 0)


def package_versions(settings: Settings, name: str) -> dict[str, str]:
    """The exact versions of REPORTED_PACKAGES in template `name`, read from its dpkg status file."""
    status = os.path.join(settings.template_lxc_path, name, "rootfs", "var", "lib", "dpkg", "status")
    out: dict[str, str] = {}
    with open(status, encoding="utf-8", errors="replace") as f:
        for stanza in f.read().split("\n\n"):
            fields = dict(ln.split(": ", 1) for ln in stanza.splitlines() if ": " in ln and not ln.startswith(" "))
            pkg = fields.get("Package", "")
            if pkg in REPORTED_PACKAGES and fields.get("Status", "").endswith(" installed"):
                out[pkg] = fields.get("Version", "")
    return out


def is_ready(settings: Settings, name: str) -> bool:
    return os.path.exists(os.path.join(settings.template_lxc_path, name, READY_MARKER))


def _chroot(rootfs: str, *argv: str, timeout: float = 900) -> None:
    # A private mount namespace: /proc and /dev mounted for the chroot vanish with it, never leak.
    script = ('set -e; mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; r="$1"; shift; '
              'exec chroot "$r" "$@"')
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", rootfs, *argv],
        timeout=timeout, env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def download_wheels(settings: Settings, recipe: Recipe) -> str:
    """Fetches the pinned wheels (and their dependencies) on the host, where PyPI is reachable; for a release
    whose Python is not the host's, the wheels built for the guest's Python (its own folder)."""
    py = RELEASES[recipe.release]
    if py == f"{sys.version_info.major}.{sys.version_info.minor}":
        os.makedirs(settings.wheelhouse, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", settings.wheelhouse,
             *recipe.wheels], timeout=900)
        return settings.wheelhouse
    house = os.path.join(settings.wheelhouse, "py" + py)
    os.makedirs(house, exist_ok=True)
    tag = "cp" + py.replace(".", "")
    platforms = [a for p in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                             "manylinux_2_34_x86_64") for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", py,
         "--implementation", "cp", "--abi", tag, "--abi", "abi3", "--abi", "none", *platforms,
         "-d", house, *recipe.wheels], timeout=900)
    return house


def build_template(settings: Settings, *, force: bool = False, release: str = "", revision: int = 0) -> str:
    """Builds the template if it is missing (or `force`); returns its name. Safe to call concurrently:
    one builder at a time per template lxcpath, the others wait and reuse its result. `release` (default:
    the host's default template, bookworm) and `revision` choose another recipe, cached under its own name.
    Its datadir seed (volume_seed.py) is made here too, so that no create waits for it."""
    from .volume_seed import seed_for  # volume_seed builds on this module

    name = _build_template(settings, force=force, release=release, revision=revision)
    seed_for(settings, name)
    return name


def _build_template(settings: Settings, *, force: bool, release: str, revision: int) -> str:
    recipe = current_recipe(release or RELEASE, revision)
    name = recipe.name if release else (settings.template or recipe.name)
    tpath = settings.template_lxc_path
    os.makedirs(tpath, exist_ok=True)
    with open(os.path.join(tpath, f".{name}.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if is_ready(settings, name) and not force:
            return name
        # A rebuilt template's unprivileged copy is stale with it.
        shutil.rmtree(os.path.join(tpath, name + SHIFTED_SUFFIX), ignore_errors=True)
        if os.path.exists(os.path.join(tpath, name)):
            log.info("removing half-built template", extra={"template": name})
            run(["lxc-destroy", "-P", tpath, "-n", name, "-f"], check=False)
            shutil.rmtree(os.path.join(tpath, name), ignore_errors=True)
        log.info("building template", extra={"template": name})
        wheelhouse = download_wheels(settings, recipe)
        run(["lxc-create", "-P", tpath, "-n", name, "-t", "debian", "--", "-r", recipe.release,
             "--packages=" + ",".join(recipe.packages)], timeout=1800)
        rootfs = os.path.join(tpath, name, "rootfs")
        staged = os.path.join(rootfs, "tmp", "wheelhouse")
        shutil.copytree(wheelhouse, staged, dirs_exist_ok=True)
        try:
            _chroot(rootfs, "python3", "-m", "venv", VENV)
            _chroot(rootfs, f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
                    "/tmp/wheelhouse", *recipe.wheels)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        for d in ("etc/reddwarf", "opt/reddwarf/lib", "var/lib/reddwarf-agent"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        _write_template_config(os.path.join(tpath, name, "config"))
        with open(os.path.join(tpath, name, READY_MARKER), "w") as f:
            json.dump({"release": recipe.release, "packages": recipe.packages, "wheels": recipe.wheels,
                       "revision": recipe.revision, "package_versions": package_versions(settings, name)}, f)
        log.info("template built", extra={"template": name})
        return name


def _write_template_config(path: str) -> None:
    # The template itself is never started; these keys are inherited by every snapshot.
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines()
                 if not ln.startswith(("lxc.net.", "lxc.apparmor.profile", "lxc.init.cmd"))]
    lines += ["lxc.net.0.type = none", "lxc.apparmor.profile = unconfined"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def ensure_subids(base: int = IDMAP_BASE, size: int = IDMAP_SIZE,
                  files: tuple[str, ...] = ("/etc/subuid", "/etc/subgid")) -> None:
    """Gives root the id range its unprivileged containers map onto (see common/subids.py)."""
    subids.ensure_subids(base, size, files)


_ACL_XATTR = "system.posix_acl_access"
# grant_search and revoke_search read, change and write back the ACLs of shared ancestors (/var, /tmp...):
# two at once, from parallel creates or from another hostd on the machine, would lose one's entry.
_ACL_LOCK = os.path.join(idmap.REGISTRY, ".acl.lock")


@contextlib.contextmanager
def _acl_edit() -> Iterator[None]:
    os.makedirs(idmap.REGISTRY, mode=0o700, exist_ok=True)
    with open(_ACL_LOCK, "w") as lock:  # an open file of its own per call: flock excludes threads too
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _acl_with_search(acl: bytes | None, mode: int, uid: int) -> bytes | None:
    """The POSIX access ACL (the kernel's xattr format) `acl` (or the plain `mode` when None) with search
    (x) added for `uid`; None when it already lets `uid` search."""
    undefined = 0xFFFFFFFF
    if acl:
        entries = {(t, i): p for t, p, i in (struct.unpack_from("<HHI", acl, o) for o in range(4, len(acl), 8))}
    else:
        entries = {(0x01, undefined): (mode >> 6) & 7, (0x04, undefined): (mode >> 3) & 7,
                   (0x20, undefined): mode & 7}
    mask = entries.get((0x10, undefined), entries[(0x04, undefined)])
    if entries.get((0x02, uid), 0) & 1 and mask & 1:
        return None
    entries[(0x02, uid)] = entries.get((0x02, uid), 0) | 1
    entries[(0x10, undefined)] = mask | 1
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for (t, i), p in sorted(entries.items()))


def grant_search(path: str, uid: int = IDMAP_BASE) -> list[str]:
    """Lets the containers' mapped root walk down to `path`: every ancestor it cannot search gets an ACL
    entry giving that one uid search (x) only — no listing, nothing for anyone else (a chmod later, as
    pytest does to its base dir, narrows the ACL's mask: the next call widens it again). Returns the
    directories changed."""
    with _acl_edit():
        return _grant_search(path, uid)


def _grant_search(path: str, uid: int) -> list[str]:
    changed = []
    d = os.path.realpath(path)
    while True:
        st = os.stat(d)
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o001 and st.st_uid != uid:
            try:
                current: bytes | None = os.getxattr(d, _ACL_XATTR)
            except OSError:
                current = None
            acl = _acl_with_search(current, stat.S_IMODE(st.st_mode), uid)
            if acl is not None:
                os.setxattr(d, _ACL_XATTR, acl)
                changed.append(d)
        if d == "/":
            return changed
        d = os.path.dirname(d)


def revoke_search(path: str, uid: int) -> list[str]:
    """Takes back what grant_search gave `uid` on `path` and its ancestors (a container's own range, at its
    delete: entries for ranges long gone would pile up in the ACLs)."""
    with _acl_edit():
        return _revoke_search(path, uid)


def _revoke_search(path: str, uid: int) -> list[str]:
    changed = []
    d = os.path.realpath(path)
    while True:
        try:
            acl = os.getxattr(d, _ACL_XATTR)
        except OSError:
            acl = b""
        if acl:
            entries = [struct.unpack_from("<HHI", acl, o) for o in range(4, len(acl), 8)]
            kept = [e for e in entries if not (e[0] == 0x02 and e[2] == uid)]
            if len(kept) != len(entries):
                os.setxattr(d, _ACL_XATTR, struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in kept))
                changed.append(d)
        if d == "/":
            return changed
        d = os.path.dirname(d)


def _relative(i: int, size: int) -> int | None:
    """Where id `i` sits in its container range (unshifted, the shared range or an isolated one), or None
    when it is in none of them (a host user's: left alone)."""
    if i < size:
        return i
    if IDMAP_BASE <= i < IDMAP_BASE + size:
        return i - IDMAP_BASE
    lo, count = idmap.subid_range()
    if lo <= i < lo + count:
        return (i - lo) % idmap.RANGE
    return None


def shift_tree(root: str, base: int = IDMAP_BASE, size: int = IDMAP_SIZE) -> int:
    """Moves every file's owner into the range at `base` (container root 0 -> host `base`; an owner in
    another container range moves to the same place in this one), keeping setuid/setgid bits (chown
    clears them). Files already in the range are left alone; returns the count."""
    changed = 0

    def shift(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        ru, rg = _relative(st.st_uid, size), _relative(st.st_gid, size)
        uid = st.st_uid if ru is None else base + ru
        gid = st.st_gid if rg is None else base + rg
        if (uid, gid) == (st.st_uid, st.st_gid):
            return
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o7000:
            os.chmod(path, stat.S_IMODE(st.st_mode))
        changed += 1

    shift(root)
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            shift(os.path.join(top, name))
    return changed


def shifted_template(settings: Settings, name: str) -> str:
    """The unprivileged copy of template `name`: its root filesystem owned by the mapped ids (so the
    container's root sees its files as root's, not nobody's) and id maps in its config, which every
    snapshot inherits (lxc-copy then gives the snapshot's upper dir to the mapped root). Made once per
    template revision (a copy plus a chown pass: seconds), beside the template; the template itself is
    left as it is for privileged containers."""
    tpath = settings.template_lxc_path
    shifted = name + SHIFTED_SUFFIX
    with open(os.path.join(tpath, f".{shifted}.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if is_ready(settings, shifted):
            return shifted
        src, dst = os.path.join(tpath, name), os.path.join(tpath, shifted)
        if not os.path.exists(os.path.join(src, READY_MARKER)):
            raise FileNotFoundError(f"template {name} is not built")
        shutil.rmtree(dst, ignore_errors=True)
        tmp = dst + ".new"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        run(["cp", "-a", "--reflink=auto", os.path.join(src, "rootfs"), os.path.join(tmp, "rootfs")],
            timeout=900)
        shift_tree(os.path.join(tmp, "rootfs"))
        with open(os.path.join(src, "config")) as f:
            lines = [ln for ln in f.read().splitlines()
                     if not ln.startswith(("lxc.rootfs.path", "lxc.uts.name", "lxc.idmap"))]
        lines += [f"lxc.rootfs.path = dir:{dst}/rootfs", f"lxc.uts.name = {shifted}",
                  f"lxc.idmap = u 0 {IDMAP_BASE} {IDMAP_SIZE}", f"lxc.idmap = g 0 {IDMAP_BASE} {IDMAP_SIZE}"]
        with open(os.path.join(tmp, "config"), "w") as f:
            f.write("\n".join(lines) + "\n")
        # The mapped root mounts the overlay inside the container's user namespace: it must be able to
        # walk down to the lower layer.
        for d in (tpath, tmp):
            os.chmod(d, os.stat(d).st_mode | 0o711)
        shutil.copy(os.path.join(src, READY_MARKER), os.path.join(tmp, READY_MARKER))
        os.rename(tmp, dst)
        log.info("unprivileged template made", extra={"template": shifted})
        return shifted


def destroy_template(settings: Settings, name: str) -> None:
    try:
        run(["lxc-destroy", "-P", settings.template_lxc_path, "-n", name, "-f"])
    except CommandError as exc:
        log.warning("template destroy failed", extra={"template": name, "error": str(exc)})
