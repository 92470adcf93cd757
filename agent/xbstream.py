"""What a mariadb-backup stream may unpack to, enforced before mbstream writes a byte.

A stored backup is tenant-made data: its xbstream names the files mbstream creates and its backup-my.cnf
holds the options `mariadb-backup --prepare` loads. So every chunk header is read here on its way to
mbstream and a path outside the allowlist (absolute, `..`, an unexpected name such as `evil.so`) stops the
extraction; afterwards the tree is walked again (regular files in at most one level of database dirs
only) and backup-my.cnf is rewritten from an allowlist of InnoDB keys (no plugin_load, plugin_dir, ...).
"""
from __future__ import annotations

import os
import re
import stat
from typing import IO

from reddwarf.common.errors import FailedPrecondition

MAGIC = b"XBSTCK01"
# magic(8) flags(1) type(1) path length(4), then the path; a payload chunk adds length(8) offset(8) crc(4).
HEADER = 14
PAYLOAD_HEADER = 20
CHUNK_PAYLOAD, CHUNK_EOF = ord("P"), ord("E")
MAX_PATH = 511  # mbstream's own limit (FN_REFLEN - 1)
COPY_BYTES = 1 << 20

# Top-level files of a full or incremental mariadb-backup (10.x/11.x): InnoDB system and undo tablespaces,
# the redo log copy, Aria logs, the tool's metadata, and the DDL markers of a backup taken during DDL.
_TOP_FILE = re.compile(
    r"(?:backup-my\.cnf|ibdata[0-9]{1,3}|ib_logfile[0-9]{1,3}|ib_redo[0-9]{1,8}|undo[0-9]{3}"
    r"|aria_log\.[0-9]{8}|aria_log_control|ib_buffer_pool|ddl_recovery\.log"
    r"|(?:xtrabackup|mariadb_backup)_[a-z_]{1,40}|donor_galera_info|[0-9]{1,10}\.(?:ren|del|crpt|new))"
    r"(?:\.delta|\.meta)?\Z")
# A database directory (filename-encoded schema names: `@0020` etc.), or a plain directory of the datadir
# that mariadb-backup also copies as one (a volume's `lost+found` holds a db.opt in the stream).
_DB_DIR = re.compile(r"[A-Za-z0-9_@$#+-][A-Za-z0-9_@$#+.-]{0,191}\Z")
# Files inside one: table and partition data of the engines mariadbd has built in, definitions, triggers,
# db.opt, and the .delta/.meta/.new/.ren/.del companions of an incremental or of DDL during the backup.
# Not .isl (a link to a tablespace elsewhere), not .MRG (a list of paths), nothing else.
_DB_FILE = re.compile(
    r"[A-Za-z0-9_@$#-][A-Za-z0-9_@$#.-]{0,250}"
    r"\.(?:ibd|frm|MYD|MYI|MAD|MAI|opt|TRG|TRN|par|CSV|CSM|ARZ|ARM|cfg|delta|meta|new|ren|del|crpt)\Z")

# backup-my.cnf: the InnoDB layout --prepare needs, each value in a shape that names no path.
_SIZE = r"[0-9]{1,20}[KMGkmg]?"
_DATA_FILE = rf"[A-Za-z0-9_]{{1,64}}:{_SIZE}(?::autoextend(?::max:{_SIZE})?)?"
_CNF_KEYS: dict[str, re.Pattern[str]] = {k: re.compile(v + r"\Z") for k, v in {
    "innodb_checksum_algorithm": r"(?:strict_)?(?:full_crc32|crc32|innodb|none)",
    "innodb_data_file_path": rf"{_DATA_FILE}(?:;{_DATA_FILE}){{0,15}}",
    "innodb_log_file_size": _SIZE,
    "innodb_log_files_in_group": r"[0-9]{1,3}",
    "innodb_page_size": r"[0-9]{1,6}[kK]?",
    "innodb_undo_directory": r"\.?/?",
    "innodb_undo_tablespaces": r"[0-9]{1,3}",
    "innodb_compression_level": r"[0-9]{1,2}",
    "innodb_log_checksums": r"(?i:on|off|0|1|true|false)",
    "innodb_log_block_size": r"[0-9]{1,6}",
    "innodb_fast_checksum": r"(?i:on|off|0|1|true|false)",
}.items()}


class BackupRefused(FailedPrecondition):
    """The backup's stream holds something a mariadb-backup stream never does: nothing of it is used."""


def check_member(path: str) -> None:
    """Refuses a stream member outside the allowlist (absolute, `..`, unexpected names or depth)."""
    parts = path.split("/")
    ok = (len(parts) == 1 and bool(_TOP_FILE.match(parts[0]))) or (
        len(parts) == 2 and bool(_DB_DIR.match(parts[0])) and bool(_DB_FILE.match(parts[1])))
    if not ok or ".." in parts or path.startswith("/"):
        raise BackupRefused(f"the backup stream holds an unexpected file {path[:200]!r}: refused, nothing "
                            "of it is restored", field="backup")


def filter_stream(src: IO[bytes], dst: IO[bytes], max_bytes: int = 0) -> int:
    """Copies an xbstream from `src` to `dst` (mbstream's stdin), chunk by chunk, refusing a chunk whose
    path is not allowed, an unknown chunk type, a payload out of order, or more than `max_bytes` of
    payload (0: no cap) before any of that chunk reaches `dst`. Returns the payload bytes copied."""
    total = 0
    ends: dict[str, int] = {}

    def exact(n: int) -> bytes:
        data = src.read(n)
        if len(data) != n:
            raise BackupRefused("the backup stream is truncated", field="backup")
        return data

    while True:
        head = src.read(HEADER)
        if not head:
            return total
        if len(head) != HEADER or head[:8] != MAGIC:
            raise BackupRefused("the backup stream is not an xbstream (bad chunk header)", field="backup")
        kind, path_len = head[9], int.from_bytes(head[10:14], "little")
        if kind not in (CHUNK_PAYLOAD, CHUNK_EOF):
            raise BackupRefused(f"the backup stream holds an unknown chunk type {kind:#x}", field="backup")
        if not 0 < path_len <= MAX_PATH:
            raise BackupRefused("the backup stream holds a chunk with a bad path length", field="backup")
        raw = exact(path_len)
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise BackupRefused(f"the backup stream holds an unexpected file {raw[:200]!r}: refused",
                                field="backup") from None
        check_member(path)
        if kind == CHUNK_EOF:
            dst.write(head + raw)
            continue
        meta = exact(PAYLOAD_HEADER)
        length, offset = int.from_bytes(meta[:8], "little"), int.from_bytes(meta[8:16], "little")
        # mbstream writes each file's chunks in order: an offset elsewhere would make a sparse giant.
        if offset != ends.get(path, 0):
            raise BackupRefused(f"the backup stream writes {path!r} out of order", field="backup")
        ends[path] = offset + length
        total += length
        if max_bytes and total > max_bytes:
            raise BackupRefused(f"the backup unpacks to more than {max_bytes} bytes: refused", field="backup")
        dst.write(head + raw + meta)
        left = length
        while left:
            data = src.read(min(left, COPY_BYTES))
            if not data:
                raise BackupRefused("the backup stream is truncated", field="backup")
            dst.write(data)
            left -= len(data)


def check_tree(root: str) -> None:
    """After mbstream: only regular files, at the top or in one level of database directories, all allowed."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and _DB_DIR.match(name):
            for inner in os.listdir(path):
                ist = os.lstat(os.path.join(path, inner))
                if not stat.S_ISREG(ist.st_mode):
                    raise BackupRefused(f"the backup unpacked a non-file {name}/{inner!r}: refused", field="backup")
                check_member(f"{name}/{inner}")
        elif stat.S_ISREG(st.st_mode):
            check_member(name)
        else:
            raise BackupRefused(f"the backup unpacked an unexpected entry {name!r}: refused", field="backup")


def sanitize_cnf(text: str) -> str:
    """backup-my.cnf rebuilt from the allowlist: only [mysqld] keys --prepare needs, values naming no path."""
    out = ["# rebuilt by reddwarf from the backup's own backup-my.cnf: allowlisted InnoDB keys only", "[mysqld]"]
    group = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            group = line.strip("[] ").lower()
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        pattern = _CNF_KEYS.get(key)
        if group == "mysqld" and sep and pattern is not None and pattern.match(value):
            out.append(f"{key}={value}")
    return "\n".join(out) + "\n"


def rebuild_cnf(root: str) -> None:
    """Replaces root/backup-my.cnf (when present) by its sanitized form, as a new file."""
    path = os.path.join(root, "backup-my.cnf")
    if not os.path.lexists(path):
        return
    with open(path, errors="replace") as f:
        text = f.read(1 << 16)
    os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(sanitize_cnf(text))
