"""course_lib.files: the one atomic write every module uses (checkpoints, exports, tokenizers,
executed notebooks, downloads)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from course_lib.files import atomic_write, scratch_file


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_the_bytes_with_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "sub" / "a.bin", lambda fh: fh.write(b"hello"))
    finally:
        os.umask(old)
    assert path == tmp_path / "sub" / "a.bin" and path.read_bytes() == b"hello"
    assert path.stat().st_mode & 0o777 == 0o644
    assert _names(path.parent) == ["a.bin"]


def test_an_existing_file_is_replaced_only_when_asked(tmp_path):
    path = atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"old"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write(path, lambda fh: fh.write(b"new"))
    assert path.read_bytes() == b"old"
    atomic_write(path, lambda fh: fh.write(b"new"), overwrite=True)
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("error", [ValueError("bad value"), ConnectionResetError("the server hung up")],
                         ids=["value-error", "writers-own-oserror"])
def test_a_failing_writer_keeps_the_old_file_and_its_error_passes_through(tmp_path, error):
    path = atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"old"))

    def write(fh):
        fh.write(b"half of the new")
        raise error

    with pytest.raises(type(error)) as info:
        atomic_write(path, write, overwrite=True)
    assert info.value is error  # not re-worded as a write failure: the disk was fine
    assert path.read_bytes() == b"old" and _names(tmp_path) == ["a.bin"]


def test_a_full_disk_at_flush_is_named(tmp_path, monkeypatch):
    path = atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"old"))
    real_fdopen = os.fdopen

    class FullAtFlush:
        def __init__(self, fh):
            self.fh = fh

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullAtFlush(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="no space left on the device") as info:
        atomic_write(path, lambda fh: fh.write(b"new"), overwrite=True)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and _names(tmp_path) == ["a.bin"]


def test_check_sees_the_finished_file_and_can_refuse_it(tmp_path):
    path = atomic_write(tmp_path / "a.txt", lambda fh: fh.write(b"good"))
    seen = []

    def refuse(tmp):
        seen.append((tmp.name, tmp.read_bytes()))
        raise LookupError("wrong checksum")

    with pytest.raises(LookupError, match="wrong checksum"):
        atomic_write(path, lambda fh: fh.write(b"corrupt"), overwrite=True, check=refuse, suffix=".part")
    assert seen[0][1] == b"corrupt" and seen[0][0].startswith(f".a.txt.{os.getpid()}.")
    assert seen[0][0].endswith(".part")
    assert path.read_bytes() == b"good" and _names(tmp_path) == ["a.txt"]


def test_leftovers_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    dead, me = _dead_pid(), os.getpid()
    keep = [f".run.pt.{me}.abc_12.tmp",                        # a write in progress in a live process
            f".run.pt.index.json.{dead}.abc_12.tmp",           # another target's temporary file
            f".run.pt.{dead}.abc_12.tmp.bak",                  # not a temporary file
            "run.pt.1.abc.tmp"]                                 # not hidden: not ours
    gone = [f".run.pt.{dead}.abc_12.tmp", f".run.pt.{dead}.x8y9z0.part"]
    for name in keep + gone:
        (tmp_path / name).write_bytes(b"partial")
    atomic_write(tmp_path / "run.pt", lambda fh: fh.write(b"x"))
    assert _names(tmp_path) == sorted(keep + ["run.pt"])


def test_scratch_file_is_named_like_a_temporary_and_always_removed(tmp_path):
    stale = tmp_path / f".a.zip.{_dead_pid()}.q1w2e3.part"
    stale.write_bytes(b"a killed download")
    with scratch_file(tmp_path / "a.zip") as scratch:
        assert scratch.is_file() and scratch.name.startswith(f".a.zip.{os.getpid()}.") and scratch.suffix == ".part"
        assert not stale.exists()
    assert not scratch.exists()
    with pytest.raises(RuntimeError):
        with scratch_file(tmp_path / "a.zip", suffix=".tmp") as scratch:
            raise RuntimeError
    assert _names(tmp_path) == []


def test_only_known_suffixes(tmp_path):
    with pytest.raises(ValueError, match="suffix must be one of"):
        atomic_write(tmp_path / "a", lambda fh: fh.write(b""), suffix=".swp")
    assert _names(tmp_path) == []


def test_move_aside_keeps_every_damaged_copy(tmp_path):
    from course_lib.files import move_aside

    path = tmp_path / "record.json"
    path.write_bytes(b"first")
    one = move_aside(path)
    path.write_bytes(b"second")
    two = move_aside(path)                     # within the same second: a second name, the first one kept
    assert not path.exists() and one != two
    assert one.read_bytes() == b"first" and two.read_bytes() == b"second"
    assert one.name.startswith("record.json.damaged-") and two.name.startswith(one.name)
    with pytest.raises(OSError):
        move_aside(tmp_path / "missing.json")


def test_locked_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path):
    import threading

    from course_lib.files import locked

    path = tmp_path / "record.json"
    got = []

    def other():
        try:
            with locked(path, timeout=0.2):
                got.append("other")
        except TimeoutError:
            got.append("timeout")

    with locked(path, timeout=0.5):
        with locked(str(path), timeout=0.5):        # the same file again: held on, no wait for itself
            got.append("inner")
        t = threading.Thread(target=other)          # still held by the outer block
        t.start()
        t.join(timeout=10)
    t = threading.Thread(target=other)              # released by the outer block
    t.start()
    t.join(timeout=10)
    assert got == ["inner", "timeout", "other"]


def test_atomic_write_and_locked_refuse_arguments_that_would_lose_a_file_or_wait_forever(tmp_path):
    from course_lib.files import atomic_write, locked

    path = tmp_path / "mine.txt"
    path.write_text("mine")
    with pytest.raises(TypeError, match="overwrite must be True or False"):     # "no" replaced the file
        atomic_write(path, lambda fh: fh.write(b"other"), overwrite="no")
    assert path.read_text() == "mine"
    with pytest.raises(ValueError, match="timeout must be a finite number >= 0"):   # -1 waited forever
        with locked(path, timeout=-1):
            pass
