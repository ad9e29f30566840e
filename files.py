"""Files that survive a crash or a power loss: every file a run writes that a later run reads (models, tokenizers,
token caches, checkpoints' run state, reports) is written to a unique temporary name, fsynced, and renamed into
place, then the directory is fsynced too. A reader sees the old file or the new one, never a half-written one; two
writers never truncate each other's temporary file; and after a power loss a renamed file is not left empty. A run
holds a lock on its output directory for as long as it lives (lock_dir). JSON is read back through read_json, whose
errors name the file."""
import atexit
import contextlib
import fcntl
import json
import os
import socket
import tempfile


def read_json(path, missing=None):
    """A JSON file's contents, or `missing` when there is no such file; a file that is not UTF-8 JSON is an error
    naming it."""
    if not os.path.isfile(path):
        return missing
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def fsync(path):
    """Flush a file, or a directory's entries (a rename or a new file in it is data too), to the disk. For files
    written by someone else's writer (safetensors, torch.distributed.checkpoint) and for folders."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path):
    """A fresh, unique temporary path next to `path` (same directory: os.replace must not cross filesystems). Its
    name holds this host and process, so that sweep_temporaries can tell a dead writer's leftovers."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def sweep_temporaries(folder):
    """Remove the temporary files in folder whose writer was killed (a SIGKILL mid-export or mid-tokenisation
    leaves them, sometimes hundreds of MB): those of this host whose process no longer exists."""
    host = _host()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        parts = name.rsplit(".", 3)  # ".<file>", "<host>-<pid>", "<random>", "tmp"
        if not (name.startswith(".") and name.endswith(".tmp") and len(parts) == 4 and "-" in parts[1]):
            continue
        writer, pid = parts[1].rsplit("-", 1)
        if writer == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):  # (another process may sweep it first)
                os.remove(os.path.join(folder, name))


def _host():
    return socket.gethostname().replace(".", "_")  # (no dots: the name is split at them)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def check_writable(folder, flag):
    """Make folder if needed and write (then remove) a file in it, before any long work: a read-only or missing
    place is a one-line error naming the flag then, not a traceback after the work."""
    try:
        os.makedirs(folder, exist_ok=True)
        os.remove(temporary_name(os.path.join(folder, "probe")))
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror})") from None


def write_atomic(path, data):
    """Write bytes or str to `path` atomically and durably (temporary name, fsync, rename, fsync of the folder),
    with the user's usual file mode (mkstemp would leave 0600)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def commit(tmp, path):
    """Rename a complete, fsynced temporary file into place with the default mode, and make the rename durable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))


# -----------------------------------------------------------------------------
# The lock a run holds on its output directory


def lock_dir(path):
    """Hold an exclusive lock on <path>/.lock for the rest of this process's life (flock: the kernel drops it when
    the process dies, however it dies), so two runs can never write one output directory at once. The file says who
    holds it (pid and host). Returns (the open lock file, which must stay open, and the previous holder's line when
    a process that died without releasing it left one: its lock is taken over)."""
    os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{path} is in use by a run that is still going ({holder}); wait for it to finish, or "
                         "choose another --out") from None
    f.seek(0)
    previous = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    atexit.register(_release, f)
    return f, previous


def _release(f):
    """A run that ends (even with an error) clears the holder line, so the next one knows nothing was left behind."""
    if not f.closed:
        f.truncate(0)
        f.close()
