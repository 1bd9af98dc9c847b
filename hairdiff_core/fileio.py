"""Atomic file writes: the one way HairDiff writes a file (images, adapters, checkpoints, CSV, JSON).

A file is written to a unique temporary name in its target folder (``tempfile.mkstemp``: two
processes writing the same output never share a temporary file), flushed to disk, given the
permissions a plain ``open()`` would give (the umask), and renamed over the target with
``os.replace``. A reader therefore sees the old file or the complete new one, never half a
file, and concurrent writers of one path each leave a complete file (the last rename wins).

Temporary names are ``.<name>.hd<pid>-<random>.tmp``; a temporary file left by a killed
process (its pid no longer runs) is removed the next time the same target is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputPathError

logger = logging.getLogger(__name__)

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # os.umask can only be read by setting it; the lock keeps threads from seeing the 0 in between.
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or cannot tell: keep its file
    return True


def _temp_prefix(name: str) -> str:
    return f".{name}.hd"


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files of ``path`` left by writers that no longer run; returns them."""
    path = Path(path)
    prefix = _temp_prefix(path.name)
    removed = []
    try:
        candidates = list(path.parent.glob(f"{glob_escape(prefix)}*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid_text = tmp.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
            logger.info("removed %s, left by an interrupted write", tmp)
        except OSError:
            pass
    return removed


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped (file names may hold ``[`` or ``*``)."""
    import glob

    return glob.escape(text)


def check_writable_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, a file path that cannot be written: empty, a folder, or in a
    folder that is a file or not writable. Creates nothing."""
    if path is None or str(path).strip() == "":
        raise OutputPathError(f"the {what} path is empty; give a file name such as result.png", input=what)
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputPathError(
            f"the {what} path {p} is an existing folder; give a file name inside it (e.g. {p / 'result.png'})",
            input=what,
        )
    _check_parent(p, what)
    return p


def check_writable_folder(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, a folder path that cannot be created or written (e.g. an existing
    file). Creates nothing."""
    if path is None or str(path).strip() == "":
        raise OutputPathError(f"the {what} folder is empty; give a folder name", input=what)
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputPathError(
            f"the {what} folder {p} is an existing file, not a folder; choose another name or remove the file",
            input=what,
        )
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(f"the {what} folder {p} is not writable; choose another folder", input=what)
        return p
    _check_parent(p, what)
    return p


def _check_parent(p: Path, what: str) -> None:
    parent = p.parent
    # The nearest existing ancestor decides: missing folders in between are created later.
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write the {what} {p}: {parent} is a file, not a folder", input=what)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write the {what} {p}: the folder {parent} is not writable", input=what)


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions ``open()`` would (0666 minus the umask): writers such as
    ``mkstemp`` and safetensors' ``save_file`` create files 0600."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    The temporary file is created (empty) in ``path``'s folder, which is created if missing;
    the caller writes it by name (any library: PIL, safetensors, matplotlib, open()). On an
    exception it is removed and ``path`` is left as it was.

    Args:
        path: the file to write.
        fsync: flush the file to disk before the rename (a power cut leaves old or new).

    Example::

        with atomic_write("out/result.png") as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is an existing folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, name = tempfile.mkstemp(prefix=f"{_temp_prefix(path.name)}{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
