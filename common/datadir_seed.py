"""The datadir seed: what mariadb-install-db makes, made once per template (hostd/volume_seed.py, with the
template's own mariadb-install-db), copied by hostd onto a fresh volume and taken over there by the agent
instead of running mariadb-install-db per instance (agent/mysqld.py). This module is the contract between the
two: where the seed lies on a volume, how it is made, and what a seed may never hold.

mariadb-install-db's output is the same for every instance of a template but for files a server writes as it
runs (the buffer pool dump, pid, logs, sockets, TLS or binlog files should a template's install-db ever leave
them): they are scrubbed from a seed when it is made and again when an agent takes one over. An instance's identity
is not in such a datadir: its server_id is in my.cnf (agent/mycnf.py), its TLS key is made in the guest, root
authenticates by unix socket only (no password in mysql.global_priv), and the internal admin and the tenant's
accounts are made after the first start. The one per-server value a seed does carry is the Aria control file's
uuid (instances of one template share it): without the control file and its log the system tables install-db wrote
are not whole (mysql.proc then reads as corrupt at its first use: checked on MariaDB 10.11), and the uuid only tells
Aria whether a table file was copied from another server; no client, replica or backup sees it.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from typing import Any

SEED_FORMAT = 2  # 2: the Aria control file and log kept (1 dropped them: see above)
# On a volume: beside the datadir (mysqld.DATADIR_ON_VOLUME), never inside it.
VOLUME_SEED_DIR = ".reddwarf-seed"
SEED_DATA = "data"
SEED_MANIFEST = "seed.json"

# mariadb-install-db's options, the same for a seed and for an instance that makes its own datadir.
INSTALL_DB_OPTIONS = ("--auth-root-authentication-method=socket", "--skip-test-db")
# The [mysqld] settings that shape what mariadb-install-db writes (the system schema's default character set);
# the guest's my.cnf sets the same (agent/mycnf.py).
CHARACTER_SET_SERVER = "utf8mb4"
COLLATION_SERVER = "utf8mb4_general_ci"
SHAPING_CNF_LINES = (f"character-set-server = {CHARACTER_SET_SERVER}", f"collation-server = {COLLATION_SERVER}",
                     "skip-log-bin")
# Configuration-group parameters that change what mariadb-install-db writes: a prepare that sets one makes its
# own datadir rather than take a seed made without it.
SHAPING_PARAMETERS = frozenset({"character_set_server", "collation_server", "default_storage_engine",
                                "innodb_file_per_table"})

# Top-level names in a datadir that are one server's own or one run's (MySQL's auto.cnf and generated TLS files
# included, should a template's install-db ever make them).
IDENTITY_PATTERNS = ("auto.cnf", "ib_buffer_pool", "ibtmp*", "*.pem", "*.pid", "*.err", "*.sock", "*.info",
                     "*-bin.*", "*-relay-bin.*", "gvwstate.dat", "grastate.dat")


def identity_files(datadir: str) -> list[str]:
    """The top-level names in `datadir` a seed may not carry."""
    return sorted(n for n in os.listdir(datadir) if any(fnmatch.fnmatch(n, p) for p in IDENTITY_PATTERNS))


def scrub(datadir: str) -> list[str]:
    """Removes what identity_files names; returns the names removed."""
    removed = identity_files(datadir)
    for name in removed:
        path = os.path.join(datadir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return removed


def write_manifest(seed_dir: str, **fields: Any) -> None:
    tmp = os.path.join(seed_dir, SEED_MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": SEED_FORMAT, **fields}, f, sort_keys=True)
    os.replace(tmp, os.path.join(seed_dir, SEED_MANIFEST))


def read_manifest(seed_dir: str) -> dict[str, Any] | None:
    """The seed's manifest when `seed_dir` holds a whole seed of this format (its data and manifest), else None."""
    try:
        with open(os.path.join(seed_dir, SEED_MANIFEST)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != SEED_FORMAT:
        return None
    if not os.path.isdir(os.path.join(seed_dir, SEED_DATA, "mysql")):
        return None
    return doc
