"""Atomic file writes: a run killed half-way never leaves a truncated file that looks complete.

Content digests of files and folders (:func:`content_digest`), for cache keys that must change
when a file at the same path changes."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import os
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. A process
    killed outright (``SIGKILL``, power loss) cannot remove it: its name holds the writer's host
    and process id, and the next write of ``path`` removes those of this host's dead processes
    (:func:`_remove_orphans`). The file
    gets the mode an ordinary ``open`` would give it: an existing ``path`` keeps its mode, a new
    one gets ``0o666`` masked by the process umask (the temporary file is created ``0o600``).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing; got mode {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target), suffix=".part")
    os.close(fd)
    os.chmod(tmp, _file_mode(target))
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_HOST = socket.gethostname().replace("/", "_")


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}@{_HOST}."


def _remove_orphans(target: Path) -> None:
    """Remove the temporary files of writes of ``target`` whose process, on this host, is dead.

    A live writer's file (here or, for a folder shared between hosts, on another host) is kept:
    removing it would fail that write."""
    head = f".{target.name}."
    for orphan in target.parent.glob(f"{glob.escape(head)}*@*.part"):
        pid, _, rest = orphan.name[len(head):].partition("@")
        if not pid.isdigit() or rest.rpartition(".")[0].rpartition(".")[0] != _HOST:
            continue
        if not _alive(int(pid)):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: the
                orphan.unlink()  # write goes on either way


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _file_mode(target: Path) -> int:
    """The permission bits of an existing ``target``, else ``0o666`` masked by the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it: restore at once
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


_FILE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes, memoized in-process by its resolved path, size, inode,
    mtime and ctime (ns): a file rewritten in place or replaced gets hashed again."""
    target = Path(path).resolve()
    st = target.stat()
    memo = (str(target), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _FILE_DIGESTS:
        sha = hashlib.sha256()
        with open(target, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        _FILE_DIGESTS[memo] = sha.hexdigest()
    return _FILE_DIGESTS[memo]


def content_digest(
    path: str | os.PathLike, patterns: Iterable[str] | None = None, recursive: bool = True
) -> str:
    """A short (16 hex) sha256 of a file's bytes, or of a folder's files: their relative paths
    and :func:`file_digest`, sorted. In a folder: the files whose names match one of the glob
    ``patterns`` (None: every file), in subfolders too when ``recursive``; names starting with
    a dot are skipped. The path itself is not part of it: the same content, the same digest."""
    root = Path(path)
    if not root.is_dir():
        return file_digest(root)[:16]
    pats = None if patterns is None else tuple(patterns)
    files = root.rglob("*") if recursive else root.iterdir()
    entries = sorted(
        (f.relative_to(root).as_posix(), file_digest(f))
        for f in files
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
        and (pats is None or any(fnmatch.fnmatch(f.name, p) for p in pats))
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
