"""The data registry and fetch(), against a real HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from course_lib import data
from course_lib.data import DataFetchError, DataFile, fetch

GOOD = b"The Verdict, but shorter. " * 2000  # ~52 KB: several chunks
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
# The staged copies: $COURSE_DATA_MIRROR when set (CI sets it), else ../shared/data beside the clone.
SHARED = Path(os.environ.get("COURSE_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _zip_of(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"folder/{member}", payload)
        zf.writestr("other.txt", b"not this one")
    return buf.getvalue()


ROUTES = {
    "/good.txt": ("ok", GOOD),
    "/corrupt.txt": ("ok", GOOD[:-1] + b"!"),
    "/drop.txt": ("drop", GOOD),
    "/archive.zip": ("ok", _zip_of("payload.txt", GOOD)),
    "/stall.txt": ("stall", GOOD),
}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        mode, body = ROUTES.get(self.path, ("404", b""))
        if mode == "404":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "stall":  # send a third, then wait until the client goes away
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.rfile.read(1)
            return
        if mode == "drop":  # promise the whole file, send a third, hang up
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here: connection refused, as with no network
    return f"http://127.0.0.1:{port}/the-file.txt"


def entry(*urls, sha=GOOD_SHA, size=len(GOOD), member=None, name="demo"):
    return DataFile(name, "sub/demo.txt", tuple(urls), sha, size, "test", "a test file", archive_member=member)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".part"))


def test_good_download_is_verified_and_written(server, tmp_path):
    _, base = server
    path = fetch(entry(f"{base}/good.txt"), cache_dir=tmp_path, mirror=None, progress=False)
    assert path == tmp_path / "sub" / "demo.txt"
    assert path.read_bytes() == GOOD
    assert leftovers(tmp_path) == []


def test_cached_file_is_not_downloaded_again(server, tmp_path):
    httpd, base = server
    e = entry(f"{base}/good.txt")
    fetch(e, cache_dir=tmp_path, mirror=None, progress=False)
    before = len(httpd.hits)
    fetch(e, cache_dir=tmp_path, mirror=None, progress=False)
    assert len(httpd.hits) == before


def test_checksum_mismatch_is_rejected_and_the_old_file_kept(server, tmp_path):
    _, base = server
    old = tmp_path / "sub" / "demo.txt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an earlier version the learner already had")
    with pytest.raises(DataFetchError) as err:
        fetch(entry(f"{base}/corrupt.txt"), cache_dir=tmp_path, mirror=None, progress=False)
    assert "sha256" in str(err.value) and "rejected" in str(err.value)
    assert old.read_bytes() == b"an earlier version the learner already had"
    assert leftovers(tmp_path) == []


def test_404_on_primary_falls_back_to_backup(server, tmp_path):
    httpd, base = server
    path = fetch(entry(f"{base}/missing.txt", f"{base}/good.txt"), cache_dir=tmp_path, mirror=None, progress=False)
    assert path.read_bytes() == GOOD
    assert httpd.hits[-2:] == ["/missing.txt", "/good.txt"]


def test_connection_dropped_mid_file(server, tmp_path):
    _, base = server
    with pytest.raises(DataFetchError) as err:
        fetch(entry(f"{base}/drop.txt"), cache_dir=tmp_path, mirror=None, progress=False)
    assert "dropped" in str(err.value)
    assert not (tmp_path / "sub" / "demo.txt").exists()
    assert leftovers(tmp_path) == []
    # ...and a working backup still rescues it
    path = fetch(entry(f"{base}/drop.txt", f"{base}/good.txt"), cache_dir=tmp_path, mirror=None, progress=False)
    assert path.read_bytes() == GOOD


def test_a_killed_download_leaves_a_part_file_that_the_next_fetch_removes(server, tmp_path):
    _, base = server
    script = ("import sys; from course_lib.data import DataFile, fetch\n"
              f"fetch(DataFile('demo', 'sub/demo.txt', ({base + '/stall.txt'!r},), None, None, 't', 't'), "
              f"cache_dir={str(tmp_path)!r}, mirror={str(tmp_path)!r}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not leftovers(tmp_path) and time.time() < deadline:  # the .part file exists: the download started
            time.sleep(0.05)
    finally:
        proc.kill()  # kill -9: no cleanup code runs
        proc.wait()
    killed = leftovers(tmp_path)
    assert killed and killed[0].startswith(f".demo.txt.{proc.pid}."), "the killed download should have left its .part"
    live = tmp_path / "sub" / f".demo.txt.{os.getpid()}.inprogress.part"  # a download still running here
    live.write_bytes(b"partial")
    path = fetch(entry(f"{base}/good.txt"), cache_dir=tmp_path, mirror=None, progress=False)
    assert path.read_bytes() == GOOD
    assert leftovers(tmp_path) == [live.name]


def test_no_network_and_no_mirror_says_how_to_stage_by_hand(closed_port_url, tmp_path, monkeypatch):
    monkeypatch.delenv("COURSE_DATA_MIRROR", raising=False)
    with pytest.raises(DataFetchError) as err:
        fetch(entry(closed_port_url, name="the-file"), cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "'the-file'" in msg                       # which file
    assert closed_port_url in msg                    # from where
    assert "by hand" in msg and "COURSE_DATA_MIRROR" in msg and GOOD_SHA in msg  # how to stage it
    assert str(tmp_path / "sub" / "demo.txt") in msg
    assert leftovers(tmp_path) == []


def test_mirror_is_used_before_the_network(closed_port_url, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "demo.txt").write_bytes(GOOD)
    path = fetch(entry(closed_port_url), cache_dir=tmp_path / "cache", mirror=mirror, progress=False)
    assert path == tmp_path / "cache" / "sub" / "demo.txt" and path.read_bytes() == GOOD


def test_corrupt_mirror_copy_falls_back_to_download(server, tmp_path):
    _, base = server
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "demo.txt").write_bytes(b"truncated")
    path = fetch(entry(f"{base}/good.txt"), cache_dir=tmp_path / "cache", mirror=mirror, progress=False)
    assert path.read_bytes() == GOOD


def test_missing_mirror_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="mirror folder"):
        fetch(entry("http://127.0.0.1:9/x"), cache_dir=tmp_path, mirror=tmp_path / "nope", progress=False)


def test_zip_member_is_extracted_and_verified(server, tmp_path):
    _, base = server
    path = fetch(entry(f"{base}/archive.zip", member="payload.txt"), cache_dir=tmp_path, mirror=None, progress=False)
    assert path.read_bytes() == GOOD
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["demo.txt"]


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="the-verdict"):
        fetch("the-verdic")


def test_registry_entries_are_well_formed():
    for e in data.REGISTRY.values():
        assert e.urls and all(u.startswith("https://") for u in e.urls), e.name
        assert e.sha256 is None or (len(e.sha256) == 64 and int(e.sha256, 16) >= 0), e.name
        assert e.license and e.description, e.name
    # every weight file has a published checksum
    assert all(e.sha256 for e in data.REGISTRY.values() if e.group == "weights")


@pytest.mark.skipif(not (SHARED / "SHA256SUMS").is_file(), reason="no staged data: set COURSE_DATA_MIRROR to the course's data mirror")
def test_registry_agrees_with_the_staged_mirror():
    """Every registered file the mirror holds has the sha256 its SHA256SUMS lists (independent record)."""
    sums = {}
    for line in (SHARED / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        sums[rel.strip()] = digest
    covered = [e for e in data.REGISTRY.values() if e.path in sums]
    assert len(covered) == len([p for p in sums if not p.startswith("tiktoken_cache/")])
    for e in covered:
        assert e.sha256 == sums[e.path], e.name


@pytest.mark.skipif(not (SHARED / "SHA256SUMS").is_file(), reason="no staged data: set COURSE_DATA_MIRROR to the course's data mirror")
def test_cli_stages_every_mirrored_file(tmp_path, capsys):
    from course_lib.cli import main

    names = [e.name for e in data.entries() if (SHARED / e.path).is_file()]
    rc = main(["data", "fetch", *names, "--mirror", str(SHARED), "--cache", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in names:
        e = data.REGISTRY[name]
        staged = tmp_path / e.path
        assert data.sha256_of(staged) == data.sha256_of(SHARED / e.path)
    assert f"{len(names)} of {len(names)} files staged" in out


# --------------------------------------------------------------------------- #
# An unusable data folder (COURSE_DATA_DIR a file, or read-only) and a damaged mirror
# --------------------------------------------------------------------------- #
from _readonly import read_only  # noqa: E402,F401  (a fixture)


def test_writable_problem_names_files_and_read_only_folders(tmp_path, read_only):
    from course_lib.paths import writable_problem

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert writable_problem(tmp_path) is None
    assert writable_problem(tmp_path / "not" / "yet") is None  # created later by whoever writes
    assert writable_problem(afile) == "is a file, not a folder"
    assert writable_problem(afile / "sub") == f"cannot be created: {afile} is a file"
    ro = read_only(tmp_path / "ro")
    assert writable_problem(ro).startswith("is read-only (")
    assert writable_problem(ro / "sub").startswith(f"cannot be created: {ro} is read-only (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro"]  # the probe leaves nothing behind


def _mirror_with(tmp_path, payload=GOOD) -> Path:
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "demo.txt").write_bytes(payload)
    return mirror


def test_cache_dir_that_is_a_file_reads_the_verified_mirror_copy_in_place(closed_port_url, tmp_path):
    mirror = _mirror_with(tmp_path)
    afile = tmp_path / "not-a-folder"
    afile.write_text("a learner's notes")
    path = fetch(entry(closed_port_url), cache_dir=afile, mirror=mirror, progress=False)
    assert path == mirror / "sub" / "demo.txt" and path.read_bytes() == GOOD
    assert afile.read_text() == "a learner's notes"


def test_read_only_cache_reads_the_verified_mirror_copy_in_place(closed_port_url, tmp_path, read_only):
    mirror = _mirror_with(tmp_path)
    cache = read_only(tmp_path / "cache")
    path = fetch(entry(closed_port_url), cache_dir=cache, mirror=mirror, progress=False)
    assert path == mirror / "sub" / "demo.txt" and path.read_bytes() == GOOD
    assert list(cache.iterdir()) == []


def test_read_only_cache_does_not_serve_a_damaged_mirror_copy(closed_port_url, tmp_path, read_only):
    mirror = _mirror_with(tmp_path, GOOD[:-1] + b"!")
    cache = read_only(tmp_path / "cache")
    with pytest.raises(ValueError, match="read-only"):
        fetch(entry(closed_port_url), cache_dir=cache, mirror=mirror, progress=False)


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unwritable_cache_without_mirror_is_one_clear_error(closed_port_url, tmp_path, monkeypatch, read_only, kind):
    if kind == "file":
        cache = tmp_path / "data"
        cache.write_text("x")
    else:
        cache = read_only(tmp_path / "data")
    monkeypatch.setenv("COURSE_DATA_DIR", str(cache))
    monkeypatch.delenv("COURSE_DATA_MIRROR", raising=False)
    with pytest.raises(ValueError) as err:
        fetch(entry(closed_port_url), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"COURSE_DATA_DIR {cache}" in msg
    assert ("is a file" if kind == "file" else "is read-only") in msg
    assert "folder you can write" in msg and "COURSE_DATA_MIRROR" in msg  # the fixes


def test_cli_fetch_into_a_file_is_one_line_on_stderr(tmp_path, capsys, monkeypatch):
    from course_lib.cli import main

    cache = tmp_path / "data"
    cache.write_text("x")
    monkeypatch.delenv("COURSE_DATA_MIRROR", raising=False)
    rc = main(["data", "fetch", "the-verdict", "--cache", str(cache), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "cache_dir (--cache)" in err
    assert cache.read_text() == "x"


def test_status_tells_a_damaged_mirror_copy_from_a_good_one(tmp_path):
    e = entry("http://127.0.0.1:9/x")
    good, bad = _mirror_with(tmp_path / "a"), _mirror_with(tmp_path / "b", GOOD[:-1] + b"!")  # same size
    assert data.status(e, cache_dir=tmp_path / "cache", mirror=good) == "in-mirror"
    assert data.status(e, cache_dir=tmp_path / "cache", mirror=bad) == "mirror-corrupt"
    assert data.status(e, cache_dir=tmp_path / "cache", mirror=bad, verify=False) == "in-mirror"  # sizes only
    assert data.file_problem(bad / "sub" / "demo.txt", e).startswith("sha256 ")


def _doctor_data_lines(monkeypatch, cache, mirror=None):
    from course_lib import doctor

    monkeypatch.setenv("COURSE_DATA_DIR", str(cache))
    if mirror is None:
        monkeypatch.delenv("COURSE_DATA_MIRROR", raising=False)
    else:
        monkeypatch.setenv("COURSE_DATA_MIRROR", str(mirror))
    return {c.what: c for c in doctor._data_checks()}


def test_doctor_fails_a_damaged_mirror_copy_naming_it_and_the_fix(tmp_path, monkeypatch):
    e = data.REGISTRY["the-verdict"]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / e.path).write_bytes(b"X" * e.size)  # the right size, the wrong bytes
    checks = _doctor_data_lines(monkeypatch, tmp_path / "cache", mirror)
    line = checks["data the-verdict"]
    assert line.level == "FAIL", str(line)
    assert str(mirror / e.path) in line.detail and "damaged" in line.detail and "sha256" in line.detail
    assert "course data fetch the-verdict" in line.detail


def test_doctor_data_folder_a_file_fails_naming_course_data_dir(tmp_path, monkeypatch):
    afile = tmp_path / "data"
    afile.write_text("x")
    line = _doctor_data_lines(monkeypatch, afile)["data folder"]
    assert line.level == "FAIL" and f"COURSE_DATA_DIR={afile} is a file" in line.detail
    assert "point COURSE_DATA_DIR at a folder you can write" in line.detail


def test_doctor_data_folder_read_only(tmp_path, monkeypatch, read_only):
    cache = read_only(tmp_path / "data")
    line = _doctor_data_lines(monkeypatch, cache)["data folder"]
    assert line.level == "FAIL" and "is read-only" in line.detail and "COURSE_DATA_DIR" in line.detail, str(line)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    line = _doctor_data_lines(monkeypatch, cache, mirror)["data folder"]  # fetch reads the mirror in place
    assert line.level == "WARN" and "read from the mirror in place" in line.detail, str(line)
    assert _doctor_data_lines(monkeypatch, tmp_path / "fresh")["data folder"].level == "OK"
