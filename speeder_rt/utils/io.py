"""Atomic file and directory writes: a reader sees the old content or the new, never a half-written one.

Every write happens in a private temporary directory beside the target, ``.NAME.XXXXXXXX.tmp``, on
which its writer holds an exclusive ``flock`` for as long as it lives. The commit gives what was written
the usual permissions (0666 / 0777 less the umask: libraries such as safetensors create private 0600
files through their own temporary files), fsyncs it, puts it in place with one rename and fsyncs the
parent directory:

- a file (:func:`atomic_path`): ``rename(.NAME.X.tmp/NAME, NAME)`` replaces the old file atomically;
- a directory (:func:`atomic_dir`): ``renameat2(RENAME_NOREPLACE)`` for the first write, and later
  ``renameat2(RENAME_EXCHANGE)``, which swaps the new directory and the old one in one step; the old
  content, now under the temporary name, is then deleted. The target so always exists and is complete,
  also while several processes write it at once (the last swap wins), with no lock file. Where the
  filesystem lacks ``renameat2`` (NFS, non-Linux), the old directory is renamed aside and the new one
  renamed in, retried until one writer's rename lands; concurrent writers still never fail and the last
  one wins, but a reader may find the target missing between the two renames.

A killed writer leaves its temporary directory behind, unlocked (the kernel drops a dead process's
locks). The next write of the same target deletes every unlocked leftover, including those of earlier
versions of this module (``.NAME.XXXXXXXX.tmp`` files and ``.NAME.old-PID`` directories), and never a
live writer's temporary directory: that one is locked. Where the filesystem has no ``flock``,
leftovers are kept rather than risk deleting a live writer's work.

Also the checked JSON readers (``read_json``, ``read_json_fields``): standard library only, so a serving process
that reads a sidecar (an ANN index's ``index.json``) loads no PyTorch.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_ALREADY_THERE = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path to write the new file at (named like ``path``, inside a private temporary directory
    beside it); on success it replaces ``path`` in one rename, after an fsync of the file. On any exception
    nothing is installed: ``path`` keeps its old content (or stays absent) and the temporary directory
    is removed."""
    path = Path(path)
    with _workspace(path) as work:
        tmp = work / path.name
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: no file was written for {path}")
        _publish(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` (a directory or
    a file) in one atomic swap, after an fsync of everything in it.

    An existing ``path`` is refused (``FileExistsError``) unless ``overwrite``, also when another process
    creates it while this one writes. On failure nothing is installed and the temporary directory is
    removed. Two processes writing the same ``path`` at once both succeed; the last to finish wins.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists")
    with _workspace(path) as tmp:
        yield tmp
        _publish(tmp)
        old = _install_dir(tmp, path, overwrite)  # temporary names now holding the old content
        _fsync(path.parent)
        for name in old:
            _remove(name)


@contextlib.contextmanager
def _workspace(target: Path) -> Iterator[Path]:
    """A new temporary directory beside ``target``, locked by this process until it is removed; the
    unlocked leftovers of earlier writes of ``target`` are deleted first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    for _ in range(100):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # taken for a leftover by another writer before this one locked it
            continue
        with contextlib.suppress(OSError):  # a filesystem without flock: no leftover is ever deleted there
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while another writer's cleanup inspects it
        if _names(tmp, fd):  # likewise
            break
        os.close(fd)
    else:
        raise RuntimeError(f"{target.parent}: could not create a temporary directory for {target.name}")
    try:
        yield tmp
    finally:
        _remove(tmp)  # before the lock is released, so no one else sees it unlocked
        os.close(fd)


def _install_dir(tmp: Path, target: Path, overwrite: bool) -> list[Path]:
    """Rename directory ``tmp`` onto ``target``; returns the temporary names now holding old content."""
    while True:
        placed = _rename2(tmp, target, _RENAME_NOREPLACE)
        if placed is None:
            return _install_dir_by_renames(tmp, target, overwrite)
        if placed:
            return []
        if not overwrite:
            raise FileExistsError(f"{target} already exists (created while this write ran)")
        if _rename2(tmp, target, _RENAME_EXCHANGE):
            return [tmp]
        # the target vanished between the two calls: place ours again


def _rename2(src: Path, dst: Path, flags: int) -> bool | None:
    """``renameat2``: True when done, False when ``dst`` exists (NOREPLACE) or is gone (EXCHANGE), None
    where the OS or the filesystem lacks it."""
    if _renameat2 is None:
        return None
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return None
    if err == (errno.EEXIST if flags == _RENAME_NOREPLACE else errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _install_dir_by_renames(tmp: Path, target: Path, overwrite: bool) -> list[Path]:
    """``_install_dir`` without renameat2: move whatever holds ``target`` aside, rename ``tmp`` in, and
    repeat while other writers do the same (each round one of them lands, so it ends)."""
    aside: list[Path] = []
    while True:
        try:
            os.rename(tmp, target)
            return aside
        except OSError as e:
            if e.errno not in _ALREADY_THERE:
                raise
            if not overwrite:
                raise FileExistsError(f"{target} already exists (created while this write ran)") from None
        old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        with contextlib.suppress(FileNotFoundError):  # another writer moved it first
            os.rename(target, old)
            aside.append(old)


def _remove_stale(target: Path) -> None:
    """Delete the leftovers of earlier writes of ``target`` that no live process holds locked."""
    leftover = re.compile(rf"\.{re.escape(target.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old-\d+)")
    with contextlib.suppress(OSError):
        for entry in os.listdir(target.parent):
            if not leftover.fullmatch(entry):
                continue
            path = target.parent / entry
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:  # gone already, a symlink, or not ours to read
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer's, or no flock here: keep it
                os.close(fd)
                continue
            if _names(path, fd):
                _remove(path)
            os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _publish(root: Path) -> None:
    """Give every file and directory under ``root`` the permissions a plain ``open`` / ``mkdir`` would
    (0666 or, for executables and directories, 0777, less the umask) and fsync them, files first."""
    mask = _umask()
    entries = [root] if root.is_file() else [
        Path(d, name) for d, _, files in os.walk(root, topdown=False) for name in [*files, ""]
    ]
    for entry in entries:  # os.walk bottom-up: a directory ("" joins to the directory) after its files
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        executable = stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)
        _fsync(entry)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(file: str | Path, what: str = "JSON file") -> Any:
    """The parsed content of ``file``; a ``ValueError`` naming the file (and the line) when it is missing or
    not JSON."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{file}: missing ({what})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: line {e.lineno}: invalid JSON ({e.msg})") from None


def read_json_fields(file: str | Path, fields: tuple[str, ...], format_version: int, what: str = "JSON file"
                     ) -> dict[str, Any]:
    """A JSON object with every field of ``fields`` and ``format_version`` equal to the one given, or a
    ``ValueError`` naming the file and the field."""
    file = Path(file)
    data = read_json(file, what)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a JSON object expected, got {type(data).__name__}")
    for name in ("format_version", *fields):
        if name not in data:
            raise ValueError(f"{file}: field {name!r} missing")
    if data["format_version"] != format_version:
        raise ValueError(f"{file}: field 'format_version' is {data['format_version']!r}; this speeder_rt reads "
                         f"{format_version}")
    return data
