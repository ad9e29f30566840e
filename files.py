"""Files that survive a crash or a power loss: every file a run writes that a later run reads (models, tokenizers,
token caches, checkpoints' run state, reports) is written to a unique temporary name, fsynced, and renamed into
place, then the directory is fsynced too. A reader sees the old file or the new one, never a half-written one; two
writers never truncate each other's temporary file; and after a power loss a renamed file is not left empty."""
import os
import tempfile


def fsync(path):
    """Flush a file, or a directory's entries (a rename or a new file in it is data too), to the disk. For files
    written by someone else's writer (safetensors, torch.distributed.checkpoint) and for folders."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path):
    """A fresh, unique temporary path next to `path` (same directory: os.replace must not cross filesystems)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


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
