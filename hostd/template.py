"""The OS template every container is snapshotted from: built once per recipe, cached, shared.

The template's name is a hash of its recipe (release, packages, the agent venv's pinned wheels), so a
changed recipe builds a new template beside the old one instead of silently reusing a stale one.
Building takes minutes (debootstrap from the cache, apt, an offline pip install); `reddwarf-hostd
build-template` runs it, and the LXC driver runs it on demand when the template is missing.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata

from reddwarf.common.runner import CommandError, run

from .settings import Settings

log = logging.getLogger("reddwarf.hostd.template")

RECIPE_VERSION = 1
RELEASE = "bookworm"
PACKAGES = ("python3", "python3-venv", "mariadb-server", "mariadb-backup", "zstd", "procps")
# The agent's third-party dependencies, installed at the host venv's exact versions.
AGENT_DISTRIBUTIONS = ("grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "pymysql",
                       "cryptography", "pyyaml")
VENV = "/opt/reddwarf/venv"
READY_MARKER = "reddwarf-template.json"


@dataclass(frozen=True)
class Recipe:
    release: str
    packages: tuple[str, ...]
    wheels: tuple[str, ...]  # "name==version"

    @property
    def digest(self) -> str:
        text = json.dumps({"v": RECIPE_VERSION, "release": self.release, "packages": self.packages,
                           "wheels": self.wheels}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"rdtpl-{self.digest}"


def current_recipe() -> Recipe:
    wheels = tuple(f"{d}=={metadata.version(d)}" for d in AGENT_DISTRIBUTIONS)
    return Recipe(release=RELEASE, packages=PACKAGES, wheels=wheels)


def template_name(settings: Settings) -> str:
    return settings.template or current_recipe().name


def is_ready(settings: Settings, name: str) -> bool:
    return os.path.exists(os.path.join(settings.template_lxc_path, name, READY_MARKER))


def _chroot(rootfs: str, *argv: str, timeout: float = 900) -> None:
    # A private mount namespace: /proc and /dev mounted for the chroot vanish with it, never leak.
    script = ('set -e; mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; r="$1"; shift; '
              'exec chroot "$r" "$@"')
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", rootfs, *argv],
        timeout=timeout, env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def download_wheels(settings: Settings, recipe: Recipe) -> str:
    """Fetches the pinned wheels (and their dependencies) on the host, where PyPI is reachable."""
    os.makedirs(settings.wheelhouse, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", settings.wheelhouse,
         *recipe.wheels], timeout=900)
    return settings.wheelhouse


def build_template(settings: Settings, *, force: bool = False) -> str:
    """Builds the template if it is missing (or `force`); returns its name. Safe to call concurrently:
    one builder at a time per template lxcpath, the others wait and reuse its result."""
    recipe = current_recipe()
    name = settings.template or recipe.name
    tpath = settings.template_lxc_path
    os.makedirs(tpath, exist_ok=True)
    with open(os.path.join(tpath, f".{name}.lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if is_ready(settings, name) and not force:
            return name
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
            json.dump({"release": recipe.release, "packages": recipe.packages, "wheels": recipe.wheels}, f)
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


def destroy_template(settings: Settings, name: str) -> None:
    try:
        run(["lxc-destroy", "-P", settings.template_lxc_path, "-n", name, "-f"])
    except CommandError as exc:
        log.warning("template destroy failed", extra={"template": name, "error": str(exc)})
