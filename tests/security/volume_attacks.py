"""Run inside an instance container as its root by tests/security/test_neighbour_volume.py: every way we
know to read a neighbour's volume, each reported as "refused" or "OK: <what it got>". argv[1] is a JSON
object naming the victim (its marker file's name and content, its volume's loop device, image, host
mount path, container dir and its init's host pid) and our own marker (to show the searches work)."""
import ctypes
import errno
import json
import os
import stat
import subprocess
import sys

v = json.loads(sys.argv[1])
out = {}


def attempt(name, fn):
    try:
        got = fn()
    except Exception as exc:  # noqa: BLE001 - every failure is a refusal; the test reads only "OK"
        out[name] = f"refused ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})"[:200]
        return
    out[name] = f"OK: {got}"[:300] if got else "refused (nothing found)"


def read_victim(path):
    with open(path, "rb") as f:
        data = f.read(4096)
    return data.decode(errors="replace") if v["secret"].encode() in data else ""


def block_devices():
    opened = []
    for top, _, files in os.walk("/dev"):
        for n in files:
            p = os.path.join(top, n)
            try:
                if stat.S_ISBLK(os.stat(p).st_mode):
                    os.close(os.open(p, os.O_RDONLY))
                    opened.append(p)
            except OSError:
                pass
    return opened


def mknod_and_read(kind, dev):
    major, minor = (int(x) for x in dev.split(":"))
    path = f"/tmp/rd-attack-{kind}"
    os.mknod(path, (stat.S_IFBLK if kind == "block" else stat.S_IFCHR) | 0o600, os.makedev(major, minor))
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, 4096).hex()[:32] or "opened"
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


def mount(*argv):
    """Mounts something at a dir of ours and looks for the victim's marker in it (and, for a procfs, under
    every process's root)."""
    at = "/tmp/rd-attack-mnt"
    os.makedirs(at, exist_ok=True)
    r = subprocess.run(["mount", *argv, at], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    try:
        if argv[:2] == ("-t", "proc"):
            return proc_roots(at)
        for top, _, files in os.walk(at):
            if v["marker"] in files:
                return read_victim(os.path.join(top, v["marker"]))
        return ""
    finally:
        subprocess.run(["umount", "-l", "/tmp/rd-attack-mnt"], capture_output=True)


def proc_roots(proc="/proc"):
    found = []
    for pid in (p for p in os.listdir(proc) if p.isdigit()):
        for d in ("var/lib/mysql", "var/lib/mysql/data", ""):
            p = os.path.join(proc, pid, "root", d, v["marker"])
            try:
                if read_victim(p):
                    found.append(p)
            except OSError:
                pass
    return found


def sys_backing_files():
    """/sys names each loop device's backing file; try to open what it names, and the loop's data."""
    got = []
    for loop in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{loop}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        try:
            with open(backing, "rb") as f:
                got.append(f"{backing}: {len(f.read(4096))} bytes")
        except OSError:
            pass
    return got


def sys_write():
    with open(f"/sys/block/{os.path.basename(v['loop'])}/queue/read_ahead_kb", "w") as f:
        f.write("0")
    return "written"


def find_by_name(marker):
    hits = []
    for top, dirs, files in os.walk("/"):
        if top in ("/proc", "/sys"):
            dirs[:] = []
            continue
        if marker in files:
            hits.append(os.path.join(top, marker))
    return hits


def open_by_handle():
    """The 'shocker' escape: a file handle of our own volume's root, opened by handle (needs
    CAP_DAC_READ_SEARCH in the host's user namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint.from_buffer(buf).value = 128
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, b"/var/lib/mysql", buf, ctypes.byref(mount_id), 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    fd = os.open("/var/lib/mysql", os.O_RDONLY)
    try:
        got = libc.open_by_handle_at(fd, buf, os.O_RDONLY)
        if got < 0:
            raise OSError(ctypes.get_errno(), errno.errorcode.get(ctypes.get_errno(), "?"))
        os.close(got)
        return "opened by handle"
    finally:
        os.close(fd)


def nsenter():
    r = subprocess.run(["nsenter", "-t", str(v["victim_pid"]), "-m", "cat", f"/var/lib/mysql/{v['marker']}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    return r.stdout


def mountinfo_names_victim():
    with open("/proc/self/mountinfo") as f:
        text = f.read()
    return [w for w in (v["volume_id"], v["mnt"], v["image"]) if w in text]


attempt("open a block device in /dev", block_devices)
attempt("mknod the victim's loop device", lambda: mknod_and_read("block", v["loop_dev"]))
attempt("mknod /dev/loop-control", lambda: mknod_and_read("char", "10:237"))
attempt("mknod the host's disk", lambda: mknod_and_read("block", v["root_dev"]))
attempt("mount the victim's loop device", lambda: mount("-t", "ext4", v["loop"]))
attempt("bind-mount the victim's mount path", lambda: mount("--bind", v["mnt"]))
attempt("mount the victim's image file", lambda: mount("-o", "loop", v["image"]))
attempt("a fresh procfs", lambda: mount("-t", "proc", "proc"))
attempt("/proc/<pid>/root of every visible process", proc_roots)
attempt("/proc/<victim's host pid>/root", lambda: read_victim(f"/proc/{v['victim_pid']}/root/var/lib/mysql/{v['marker']}"))
attempt("nsenter the victim's mount namespace", nsenter)
attempt("the loop backing files /sys names", sys_backing_files)
attempt("write to /sys", sys_write)
attempt("the victim's volume by its host mount path", lambda: read_victim(os.path.join(v["mnt"], v["marker"])))
attempt("the victim's image file by its host path", lambda: read_victim(v["image"]))
attempt("hostd's state dir", lambda: os.listdir(v["state"]))
attempt("the victim's container dir", lambda: os.listdir(v["victim_dir"]))
attempt("the victim's marker by name anywhere", lambda: find_by_name(v["marker"]))
attempt("open_by_handle_at", open_by_handle)
attempt("/dev/mem", lambda: open("/dev/mem", "rb").read(16).hex())
attempt("/proc/kcore", lambda: open("/proc/kcore", "rb").read(16).hex())
attempt("the host's view of the victim in our mount table", mountinfo_names_victim)
# Teeth: the same search finds our own marker on our own volume.
own = find_by_name(v["own_marker"])
out["own marker found"] = "yes" if own else "no"
print(json.dumps(out))
