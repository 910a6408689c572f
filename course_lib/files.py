"""Files written so that nothing a learner made is lost (cross-cutting: imports nothing from the steps).

* :func:`atomic_write` — write a temporary file beside the target, ``fsync`` it, optionally
  check it, then rename it over the target in one step: the target is the old file or the
  complete new one, never half of one. A full disk is named as such; new files get the
  usual permissions (``0o666`` less the umask).
* :func:`scratch_file` — a temporary file beside a target for work that is never renamed
  into place (a downloaded archive to extract from); deleted afterwards.
* :func:`check_writable` — fail early, with a clear message, where a later save would fail.
* :func:`publish` — the final step of every write: permissions, then ``os.replace``.
* :func:`locked` — hold a lock across processes for a read-change-write of one file (the
  learner's progress: a notebook and ``course check`` may save at the same moment).

Every temporary file is named ``.<target name>.<process id>.<random>.tmp`` (``.part`` for
downloads). The next write to the same target deletes those whose process is gone (a save
or download killed outright), and leaves those of live processes alone.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

from .checks import boolean, finite_number
from .paths import writable_problem

__all__ = ["atomic_write", "scratch_file", "check_writable", "publish", "move_aside", "locked"]

_TEMP_SUFFIXES = (".tmp", ".part")
_HELD = threading.local()   # the lock files this thread holds through locked(), and how many times


def check_writable(path: str | os.PathLike, what: str = "path") -> Path:
    """Make sure a file can be written at ``path`` (creating its missing folders) before work
    that would otherwise fail only when it saves.

    Creates and removes a temporary file in the folder, so a read-only file system or a
    folder without write permission is caught whoever runs it.

    Returns:
        ``path`` as an expanded :class:`~pathlib.Path`.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        NotADirectoryError: a parent of ``path`` is a file.
        PermissionError: the folder cannot be written (or created).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name inside it, e.g. {path / 'run.pt'}")
    _make_folder(path, what)
    return path


def _make_folder(path: Path, what: str) -> None:
    """Create the folder of ``path``, or raise NotADirectoryError / PermissionError naming why it cannot be written."""
    problem = writable_problem(path.parent)
    if problem is not None:
        error = NotADirectoryError if "is a file" in problem else PermissionError
        raise error(f"cannot write {what} {path}: the folder {path.parent} {problem}; choose a path in a folder "
                    "you can write to")
    path.parent.mkdir(parents=True, exist_ok=True)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell cheaply: keep the file (only POSIX cleans by process id)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete the temporary files of earlier writes to ``path`` whose process is gone (killed mid-write).

    Only names of the form ``.<path name>.<pid>.<random>.tmp`` (or ``.part``) count: the
    temporary file of a live process is another write in progress, and the temporary file
    of another target whose name starts the same (``model.safetensors.index.json`` beside
    ``model.safetensors``) does not match.
    """
    suffixes = "|".join(re.escape(s) for s in _TEMP_SUFFIXES)
    pattern = re.compile(rf"{re.escape('.' + path.name)}\.(\d+)\.[A-Za-z0-9_]+(?:{suffixes})")
    try:
        candidates = [(p, m) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except OSError:
        return
    for tmp, match in candidates:
        if not _pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)


def _new_temp(path: Path, suffix: str) -> tuple[int, str]:
    """An open, empty temporary file beside ``path`` (after removing dead processes' leftovers)."""
    if suffix not in _TEMP_SUFFIXES:
        raise ValueError(f"suffix must be one of {_TEMP_SUFFIXES}, got {suffix!r}")
    _remove_stale_temps(path)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=suffix)


def publish(tmp: str | os.PathLike, dest: Path) -> None:
    """Give a finished temporary file the usual permissions (``mkstemp`` makes it owner-only,
    which would hide a classroom mirror from learners) and rename it over ``dest``."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, dest)


@contextmanager
def scratch_file(beside: str | os.PathLike, suffix: str = ".part") -> Iterator[Path]:
    """An empty temporary file in ``beside``'s folder, deleted when the ``with`` block ends.

    For intermediate files that are never renamed into place (a downloaded archive whose
    member :func:`atomic_write` then extracts). Named like :func:`atomic_write`'s
    temporaries, so one left by a killed process is removed by the next write to ``beside``.

    Args:
        beside: the target the work is for; its folder must exist.
        suffix: ``".part"`` (default) or ``".tmp"``.
    """
    beside = Path(beside).expanduser()
    fd, tmp = _new_temp(beside, suffix)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


class _WriteRecorder:
    """A binary file wrapper that remembers the first ``OSError`` a write or flush raised.

    ``torch.save`` turns a failed write into ``RuntimeError: ... unexpected pos``; the
    recorded error lets :func:`atomic_write` say what really happened (a full disk), and
    tells it apart from an ``OSError`` of the writer's own (a dropped download)."""

    def __init__(self, fh):
        self._fh, self.error = fh, None

    def _record(self, method, *args):
        try:
            return method(*args)
        except OSError as err:
            self.error = self.error or err
            raise

    def write(self, data):
        return self._record(self._fh.write, data)

    def flush(self):
        return self._record(self._fh.flush)

    def fsync(self):
        return self._record(os.fsync, self._fh.fileno())

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _write_failed(path: Path, failed: OSError) -> OSError:
    if failed.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(failed.errno, f"no space left on the device holding {path.parent} while writing "
                       f"{path.name}; the previous file (if any) is kept unchanged. Free some space "
                       "or write somewhere else, then save again")
    return OSError(failed.errno, f"could not write {path}: {failed.strerror or failed}; the previous "
                   "file (if any) is kept unchanged")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], overwrite: bool = False, *,
                 check: Callable[[Path], object] | None = None, suffix: str = ".tmp") -> Path:
    """Call ``write(file_object)`` on a temporary file, then move it to ``path`` in one step.

    The temporary file lives in ``path``'s folder (so the final ``os.replace`` is a rename on
    one file system), is flushed and ``fsync``-ed, then given to ``check``, and is deleted if
    ``write`` or ``check`` raises: ``path`` is either the old file or the complete new one,
    never half. Temporary files of earlier writes to ``path`` that were killed outright are
    removed first. The new file gets the permissions of any new file (``0o666`` less the umask).

    Args:
        path: the destination file; missing parent folders are created.
        write: a function taking a binary file object.
        overwrite: replace an existing ``path``. Default ``False``.
        check: called with the finished temporary file's path before the rename; raise to
            keep the old file (e.g. a download whose checksum is wrong). Default: none.
        suffix: of the temporary file, ``".tmp"`` (default) or ``".part"`` (downloads).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is ``False``.
        TypeError: ``overwrite`` not ``True``/``False``; ``path`` empty or not a path.
        IsADirectoryError, NotADirectoryError, PermissionError: as :func:`check_writable`.
        OSError: writing the temporary file failed (the disk is full: ``errno.ENOSPC``); the
            message names the file, and the previous file at ``path`` is kept.
        Any error ``write`` or ``check`` raise themselves (a network error of a download) passes
        through unchanged.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise TypeError(f"path must be a file path (a str or Path), got {path!r}")
    overwrite = boolean("overwrite", overwrite)     # "no" is truthy: it replaced the file
    path = Path(path).expanduser()
    if path.exists() and not overwrite and not path.is_dir():
        raise FileExistsError(f"{path} already exists and was not overwritten; pass overwrite=True to replace "
                              "it, or choose another file name")
    check_writable(path, "the file")
    fd, tmp = _new_temp(path, suffix)
    try:
        with os.fdopen(fd, "wb") as raw:
            fh = _WriteRecorder(raw)
            try:
                write(fh)
                fh.flush()
                fh.fsync()
            except Exception as err:
                if fh.error is None:  # not the file's fault: the writer's own error
                    raise
                raise _write_failed(path, fh.error) from err
        if check is not None:
            check(Path(tmp))
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (not possible on every OS / file system)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def move_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged file to ``<name>.damaged-<UTC time>`` beside it, never over an earlier one
    (``-1``, ``-2``, ... are added), so that what a learner made is kept, not overwritten.

    Returns:
        the new path.

    Raises:
        OSError: the rename failed (the file stays where it was).
    """
    from datetime import datetime, timezone

    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside, n = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.damaged-{stamp}-{n}"), n + 1
    os.rename(path, aside)
    return aside



@contextmanager
def locked(path: str | os.PathLike, timeout: float = 30.0) -> Iterator[Path]:
    """Hold an exclusive lock for ``path`` for the ``with`` block, across processes and threads:
    wrap a read-change-write of the file in it so that two writers at once do not lose one
    change (each would read the old file and the second rename would drop the first's change).

    The lock is ``filelock``'s, on the hidden file ``.<name>.lock`` beside ``path`` (left there
    afterwards; the operating system frees the lock when its process ends, so a killed process
    leaves none held). It is reentrant in one thread: a ``locked(path)`` inside another for the
    same file holds it on (it does not wait for itself).

    >>> with locked(progress_file):                                          # doctest: +SKIP
    ...     data = load(progress_file); data["runs"] += 1; save(data, progress_file)

    Yields:
        ``path`` as an expanded :class:`~pathlib.Path` (its folder created).

    Raises:
        TimeoutError: another holder kept the lock for ``timeout`` seconds (default 30).
        NotADirectoryError, PermissionError: the folder of ``path`` cannot be made or written (named).
        ValueError: ``timeout`` not a finite number >= 0 (a negative one waited forever).
    """
    timeout = finite_number("timeout", timeout, minimum=0, hint=" (seconds)")
    path = Path(path).expanduser()
    _make_folder(path, "file")
    lock_file = path.with_name(f".{path.name}.lock")
    key = os.path.realpath(lock_file)
    held = _HELD.__dict__.setdefault("counts", {})
    if held.get(key):
        held[key] += 1
        try:
            yield path
        finally:
            held[key] -= 1
        return
    lock = FileLock(lock_file, timeout=timeout, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(f"{path} is being written by another process (it holds {lock_file}) and was not "
                           f"released within {timeout:g} s; let that command (a notebook cell, `course check`) "
                           "finish, then run this again") from None
    held[key] = 1
    try:
        yield path
    finally:
        held.pop(key, None)
        lock.release()
