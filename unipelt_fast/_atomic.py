"""Crash-safe file writes: every file the package writes goes through here.

A file is written under a temporary name in its own directory, flushed and fsync'ed, then
made visible with one ``os.replace`` (atomic on POSIX and Windows), and the directory is
fsync'ed so the rename itself is durable. A kill at any moment leaves either the old file or
the new one under the final name, never a truncated one; the worst a kill leaves behind is a
stray ``.<name>.*.tmp`` file, which :func:`remove_stale_temps` cleans up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Callable, Iterator

TMP_TAG = ".tmp"


def fsync_dir(path: str) -> None:
    """fsync a directory, so renames and new entries in it survive a power loss. A no-op
    where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename still holds
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A fresh temporary name beside ``path``: hidden, with ``path``'s extension kept last
    (matplotlib picks the image format from it)."""
    head, base = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(base)[1]
    return os.path.join(head, f".{base}.{secrets.token_hex(6)}{TMP_TAG}{ext}")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to (by any writer that takes
    a path: safetensors, matplotlib); on a clean exit it is fsync'ed and renamed over
    ``path``. On an exception the temporary file is removed and ``path`` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(parent)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` crash-safely."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` crash-safely."""
    write_bytes(path, text.encode(encoding))


def write_with(path: str, writer: Callable[[str], object]) -> None:
    """``writer(tmp_path)`` writes the content; ``path`` then gets it crash-safely."""
    with atomic_path(path) as tmp:
        writer(tmp)


def remove_stale_temps(directory: str, prefix: str) -> None:
    """Remove the temporary files :func:`temp_name` made for names in ``directory`` that
    start with ``prefix`` (left by writes that were killed). Only call it where no other
    writer is writing such a name right now."""
    start = "." + prefix
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(start) and TMP_TAG in name:
                p = os.path.join(directory, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(p)


# ---- swapping a whole directory (fixed file names, e.g. peft's pair) ----------------------

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``). Returns False where that is not available (other systems, old
    kernels, filesystems without it); then nothing changed."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    import errno

    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), a)


def write_files(path: str, files: dict[str, bytes], owned: set[str]) -> str:
    """Write several files with fixed names into the directory ``path`` as one unit where
    the system allows it. Returns how: "rename" (``path`` did not exist: a staging directory
    is renamed to it), "exchange" (``path`` held only names in ``owned``: a staging
    directory with the new files is swapped with it atomically, then the old one removed),
    or "per-file" (elsewhere: each file is replaced atomically, in ``files``' order, after
    all of them are written and fsync'ed). In the first two a kill at any moment leaves
    ``path`` with the old set or the new one; "per-file" keeps every file whole but a kill
    between two renames leaves the files before it new and those after it old."""
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, base + ".")
    existing = os.listdir(path) if os.path.isdir(path) else None
    if existing is not None:
        for name in owned:
            remove_stale_temps(path, name + ".")
        existing = os.listdir(path)
    if existing is None or set(existing) <= owned:
        staging = os.path.join(parent, f".{base}.{secrets.token_hex(6)}{TMP_TAG}")
        os.mkdir(staging)
        try:
            for name, data in files.items():
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(staging)
            if existing is None:
                os.rename(staging, path)  # fails (nothing changed) if path appeared meanwhile
                fsync_dir(parent)
                return "rename"
            with contextlib.suppress(OSError):
                os.chmod(staging, os.stat(path).st_mode & 0o7777)
            if exchange(staging, path):
                fsync_dir(parent)
                return "exchange"
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the old set, after an exchange
    tmps = {}
    try:
        for name, data in files.items():
            tmps[name] = temp_name(os.path.join(path, name))
            with open(tmps[name], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in tmps.items():
            os.replace(tmp, os.path.join(path, name))
    except BaseException:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    fsync_dir(path)
    return "per-file"
