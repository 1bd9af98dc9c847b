"""Atomic file writes: the one way HairDiff writes a file (images, adapters, checkpoints, CSV, JSON).

A file is written to a unique temporary name in its target folder (``tempfile.mkstemp``: two
processes writing the same output never share a temporary file), flushed to disk, given the
permissions a plain ``open()`` would give (the umask), and renamed over the target with
``os.replace``. A reader therefore sees the old file or the complete new one, never half a
file, and concurrent writers of one path each leave a complete file (the last rename wins).

Temporary names are ``.<name>.hd<pid>-<random>.tmp``, with the name's stem shortened (and a
hash of the full name added) where that would pass the filesystem's name limit, so a temporary
name fits whenever the final name does; a temporary file left by a killed process (its pid no
longer runs) is removed the next time the same target is written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskFullError, InputError, OutputPathError

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


#: Bytes a temporary name adds to its prefix: a pid of up to 10 digits, "-", mkstemp's 8
#: random characters and ".tmp".
_TEMP_TAIL = 10 + 1 + 8 + 4
#: The name limit assumed where the filesystem does not say (ext4, xfs, btrfs, APFS, NTFS: 255).
DEFAULT_NAME_MAX = 255


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that the filesystem holding ``folder`` (or its nearest
    existing ancestor) takes."""
    folder = _existing_ancestor(Path(folder))
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return DEFAULT_NAME_MAX


def _existing_ancestor(p: Path) -> Path:
    for candidate in (p, *p.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError:  # a component too long: its parent decides
            continue
    return Path(".")


def _temp_prefix(name: str, limit: int = DEFAULT_NAME_MAX) -> str:
    # A name near the limit gets a shortened stem plus a hash of the full name, so the
    # temporary name fits whenever the final one does (and still names its target).
    prefix = f".{name}.hd"
    if len(os.fsencode(prefix)) + _TEMP_TAIL <= limit:
        return prefix
    import hashlib

    tag = hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
    room = max(1, limit - _TEMP_TAIL - len(f"..~{tag}.hd"))
    stem = os.fsencode(name)[:room].decode("utf-8", "ignore") or "x"
    return f".{stem}~{tag}.hd"


def check_name_lengths(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, a path with a component longer than its filesystem's name limit
    (usually 255 bytes: UTF-8 letters outside ASCII count 2-4)."""
    p = Path(path).expanduser()
    limit = name_max(p.parent)
    for part in p.parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else part[:20] + "..." + part[-12:]
            raise OutputPathError(
                f"the {what} name {shown!r} is {size} bytes long, more than the {limit} bytes this filesystem "
                f"allows for a name; choose a shorter name",
                input=what,
            )
    return p


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files of ``path`` left by writers that no longer run; returns them."""
    path = Path(path)
    prefix = _temp_prefix(path.name, name_max(path.parent))
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


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def check_input_path(
    path: str | os.PathLike, what: str = "input", kind: str = "file", input: str | None = None
) -> Path:
    """Refuse, before it is opened, an input path that is not of the expected ``kind``:
    ``"file"`` (a regular file), ``"folder"`` or ``"any"`` (either). A pipe, socket or device is
    refused whatever ``kind``: opening a FIFO blocks until someone writes to it, and a device
    never ends. A missing path raises ``FileNotFoundError`` (the CLI: "file not found: PATH").

    Args:
        path: the path given.
        what: how the message names it, e.g. ``"--image"`` or ``"adapter"``.
        kind: ``"file"``, ``"folder"`` or ``"any"``.
        input: the argument name for ``HairDiffError.input``.
    """
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode  # follows symlinks: a link to a regular file is a regular file
    except FileNotFoundError:
        raise FileNotFoundError(2, "No such file" if kind != "folder" else f"{what} folder not found", str(p)) from None
    except OSError as exc:
        raise InputError(f"cannot read the {what} {p}: {exc.strerror or exc}", input=input) from None
    for test, name in _SPECIAL_KINDS:
        if test(mode):
            raise InputError(
                f"the {what} {p} is a {name}, not a regular file; HairDiff reads files saved on disk "
                f"(a pipe would block until written to): save its content to a file and pass that",
                input=input,
            )
    if stat.S_ISDIR(mode) and kind == "file":
        raise InputError(f"the {what} {p} is a folder; give a file", input=input)
    if not stat.S_ISDIR(mode) and kind == "folder":
        raise InputError(f"the {what} {p} is a file, not a folder; give the folder that holds it", input=input)
    return p


def check_writable_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, a file path that cannot be written: empty, a folder, or in a
    folder that is a file or not writable. Creates nothing."""
    if path is None or str(path).strip() == "":
        raise OutputPathError(f"the {what} path is empty; give a file name such as result.png", input=what)
    p = check_name_lengths(path, what)
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
    p = check_name_lengths(path, what)
    if p.exists() and not p.is_dir():
        raise OutputPathError(
            f"the {what} folder {p} is an existing file, not a folder; choose another name or remove the file",
            input=what,
        )
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(f"the {what} folder {p} is not writable; choose another folder", input=what)
        _probe(p, p, what, "folder ")
        return p
    _check_parent(p, what, "folder ")
    return p


def _check_parent(p: Path, what: str, kind: str = "") -> None:
    parent = p.parent
    # The nearest existing ancestor decides: missing folders in between are created later.
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write the {what} {p}: {parent} is a file, not a folder", input=what)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write the {what} {p}: the folder {parent} is not writable", input=what)
    _probe(parent, p, what, kind)


def _probe(folder: Path, target: Path, what: str, kind: str = "") -> None:
    """Create and remove an empty folder in ``folder``: the only test that holds for root (whom
    ``os.access`` always answers yes) and for /proc, /sys or a FUSE mount that refuses new
    entries, so such an output fails before the work rather than after it."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hairdiff-probe-", dir=folder))
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(target, what=what) from None
        reason = exc.strerror or str(exc)
        raise OutputPathError(
            f"cannot write the {what} {kind}{target}: {folder} does not take new files ({reason}); "
            f"choose another folder",
            input=what,
        ) from None


#: errno values that mean "the disk or the quota is full".
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e is not None)
# Libraries that wrap the OSError in their own exception (safetensors' Rust writer) keep its text.
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "File too large")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk or quota."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, DiskFullError) or any(t in str(exc) for t in _DISK_FULL_TEXTS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def disk_full_error(
    path: str | os.PathLike,
    done: str = "",
    what: str = "output",
    fix: str = "free some space (or write to another disk) and run again",
) -> DiskFullError:
    """The one message of a full disk: where, how much is free, what was done, and the fix."""
    import shutil

    where = _existing_ancestor(Path(path).expanduser())
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"no space left on the disk holding {path} ({free}){'; ' + done if done else ''}: {fix}",
        input=what,
    )


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
    path = check_name_lengths(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is an existing folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    prefix = _temp_prefix(path.name, name_max(path.parent))
    try:
        fd, name = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, f"{path.name} was not written") from exc
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(path, f"{path.name} was not written, any earlier one is kept") from exc
        raise
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
