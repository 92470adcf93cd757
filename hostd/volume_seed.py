"""A template's datadir seed (common/datadir_seed.py): made once per template by the template's own
mariadb-install-db, kept beside its root filesystem, and copied onto each fresh volume a container of it gets,
so that the guest takes it over instead of running mariadb-install-db (seconds under a small flavor's CPU and
IO caps) for every instance.

The seed is made lazily on first use (or at the template's build) and made again whenever its stamp no longer
matches: the stamp covers the template's recipe record, its mariadbd binary and how seeds are made, so a
template rebuilt or changed in place never hands out a datadir of its former self.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil

from reddwarf.common import datadir_seed as contract
from reddwarf.common.runner import CommandError, run

from . import template
from .settings import Settings

log = logging.getLogger("reddwarf.hostd.volume_seed")

SEED_DIR = "volume-seed"  # in the template's directory, beside rootfs (never in it: snapshots share rootfs)
FAILED_MARKER = "volume-seed.failed"  # the stamp of a template that could not make one: not tried again
MARIADBD = ("usr/sbin/mariadbd", "usr/sbin/mysqld")


def _template_dir(settings: Settings, name: str) -> str:
    return os.path.join(settings.template_lxc_path, name)


def stamp(settings: Settings, name: str) -> str | None:
    """What the seed of template `name` must have been made from; None when the template has no mariadbd."""
    tdir = _template_dir(settings, name)
    rootfs = os.path.join(tdir, "rootfs")
    binary = next((os.path.join(rootfs, b) for b in MARIADBD if os.path.exists(os.path.join(rootfs, b))), None)
    if binary is None:
        return None
    st = os.stat(binary)
    try:
        with open(os.path.join(tdir, template.READY_MARKER), "rb") as f:
            recipe = f.read()
    except FileNotFoundError:
        return None  # not built (or half built): no seed from it
    doc = {"format": contract.SEED_FORMAT, "recipe": hashlib.sha256(recipe).hexdigest(),
           "mariadbd": [os.path.relpath(binary, rootfs), st.st_size, st.st_mtime_ns],
           "options": contract.INSTALL_DB_OPTIONS, "cnf": contract.SHAPING_CNF_LINES}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def seed_for(settings: Settings, name: str) -> str | None:
    """The directory of template `name`'s seed, made (or made again) when missing or stale; None when the
    template cannot make one (no mariadbd, or mariadb-install-db failed: the guest then makes its own)."""
    want = stamp(settings, name)
    if want is None:
        return None
    tdir = _template_dir(settings, name)
    seed = os.path.join(tdir, SEED_DIR)
    manifest = contract.read_manifest(seed)
    if manifest is not None and manifest.get("stamp") == want:
        return seed
    with open(os.path.join(settings.template_lxc_path, f".{name}.seed.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        manifest = contract.read_manifest(seed)  # another hostd may have made it while we waited
        if manifest is not None and manifest.get("stamp") == want:
            return seed
        failed = os.path.join(tdir, FAILED_MARKER)
        try:
            with open(failed) as f:
                if f.read().strip() == want:
                    return None
        except FileNotFoundError:
            pass
        try:
            _make(tdir, want)
        except (CommandError, OSError) as exc:
            log.warning("no datadir seed for this template; guests run mariadb-install-db",
                        extra={"template": name, "error": str(exc)[-300:]})
            with open(failed, "w") as f:
                f.write(want + "\n")
            return None
        log.info("datadir seed made", extra={"template": name, "stamp": want})
        return seed


def _make(tdir: str, want: str) -> None:
    rootfs = os.path.join(tdir, "rootfs")
    seed = os.path.join(tdir, SEED_DIR)
    work = seed + ".new"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    os.chmod(work, 0o755)  # mariadbd, as the template's mysql user, walks through it
    with open(os.path.join(work, "my.cnf"), "w") as f:
        f.write("\n".join(["[mysqld]", *contract.SHAPING_CNF_LINES, ""]))
    install_db = next((p for p in ("usr/bin/mariadb-install-db", "usr/bin/mysql_install_db")
                       if os.path.exists(os.path.join(rootfs, p))), None)
    if install_db is None:
        raise FileNotFoundError("the template has no mariadb-install-db")
    # The template's own install-db in a chroot of it, in a private mount namespace: /proc, /dev and the work
    # directory (at /mnt) are mounted there only, so the containers sharing this rootfs see none of it.
    script = ('set -e; mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; mount --bind "$2" "$1/mnt"; '
              'r="$1"; shift 2; exec chroot "$r" "$@"')
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", rootfs, work,
         "/" + install_db, "--defaults-file=/mnt/my.cnf", "--datadir=/mnt/data", "--user=mysql",
         *contract.INSTALL_DB_OPTIONS], timeout=600, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    os.unlink(os.path.join(work, "my.cnf"))
    contract.scrub(os.path.join(work, contract.SEED_DATA))
    contract.write_manifest(work, stamp=want, made_by=os.path.basename(install_db))
    shutil.rmtree(seed, ignore_errors=True)
    os.rename(work, seed)


def seed_volume(seed: str, volume: str, base: int = 0) -> bool:
    """Copies `seed` onto the fresh volume mounted at `volume` (nothing on it but lost+found, or a copy cut off
    earlier), sparsely (the redo log is mostly zeros: a few MB are written, not ~110), owned by the container's
    mapped ids from `base` when given. False, and nothing touched, when the volume holds anything else."""
    target = os.path.join(volume, contract.VOLUME_SEED_DIR)
    partial = target + ".tmp"
    present = set(os.listdir(volume)) - {"lost+found"}
    if present == {contract.VOLUME_SEED_DIR}:
        return True  # seeded by a create cut off later
    if present - {os.path.basename(partial)}:
        return False  # a volume with data (a migration, an upgrade, a restore): never touched
    shutil.rmtree(partial, ignore_errors=True)
    run(["cp", "-a", "--sparse=always", seed, partial], timeout=300)
    if base:
        template.shift_tree(partial, base)
    # Durable before the guest sees it: the guest's mysqld trusts these files as its own (it fsyncs what it
    # writes, not what it found), so a host lost right after the create would otherwise leave the volume with
    # the seed's files half on disk (a 0-byte aria_log_control: the instance never starts again elsewhere).
    run(["sync", "--file-system", volume], timeout=300)
    os.rename(partial, target)
    run(["sync", "--file-system", volume], timeout=300)  # and the rename with it
    return True
