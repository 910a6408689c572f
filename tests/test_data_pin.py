"""Files with no published sha256 (TinyStories' full training file): pinned on first download, checked after.

The "upstream" here is a ``file://`` URL, which ``fetch`` downloads through the same code as https.
"""

from __future__ import annotations

import hashlib

import pytest

from course_lib import data
from course_lib.data import DataFetchError, DataFile, fetch, pin_path

GOOD = b"Once upon a time there was a pinned file.\n" * 500


def _entry(url: str) -> DataFile:
    return DataFile("unpublished", "sub/big.txt", (url,), None, None, "test", "no published checksum")


@pytest.fixture
def upstream(tmp_path):
    src = tmp_path / "upstream.txt"
    src.write_bytes(GOOD)
    return src


def test_first_download_pins_the_sha256_and_later_uses_are_checked_against_it(tmp_path, upstream):
    e, cache = _entry(upstream.as_uri()), tmp_path / "cache"
    path = fetch(e, cache_dir=cache, mirror=None, progress=False)
    assert path.read_bytes() == GOOD
    pin = pin_path(path)
    assert pin == cache / "sub" / "big.txt.sha256"
    assert pin.read_text() == f"{hashlib.sha256(GOOD).hexdigest()}  big.txt\n"  # sha256sum's format
    assert data.status(e, cache_dir=cache, mirror=None) == "cached"
    path.write_bytes(GOOD[:-1] + b"!")  # damaged in place, same size: caught by the pin
    assert data.status(e, cache_dir=cache, mirror=None) == "corrupt"
    assert fetch(e, cache_dir=cache, mirror=None, progress=False).read_bytes() == GOOD  # fetched again


def test_a_changed_upstream_file_is_refused_until_the_pin_is_deleted(tmp_path, upstream):
    e, cache = _entry(upstream.as_uri()), tmp_path / "cache"
    path = fetch(e, cache_dir=cache, mirror=None, progress=False)
    path.unlink()
    upstream.write_bytes(b"a new upstream version")
    with pytest.raises(DataFetchError, match="pinned in .*big.txt.sha256.*delete it"):
        fetch(e, cache_dir=cache, mirror=None, progress=False)
    assert not path.exists()
    pin_path(path).unlink()
    assert fetch(e, cache_dir=cache, mirror=None, progress=False).read_bytes() == b"a new upstream version"


def test_a_copy_from_the_mirror_is_pinned_too(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "big.txt").write_bytes(GOOD)
    e = _entry("https://127.0.0.1:9/never-used")
    path = fetch(e, cache_dir=tmp_path / "cache", mirror=mirror, progress=False)
    assert pin_path(path).read_text().split()[0] == hashlib.sha256(GOOD).hexdigest()


def test_tinystories_train_is_registered_without_a_checksum_and_optional():
    e = data.REGISTRY["tinystories-train"]
    assert e.urls == ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",)
    assert e.sha256 is None and e.optional and e.group == "text" and "pinned" in e.description
    assert e not in data.entries(include_optional=False)


def test_a_damaged_pin_file_lets_no_changed_copy_through(tmp_path, upstream):
    e, cache = _entry(upstream.as_uri()), tmp_path / "cache"
    path = fetch(e, cache_dir=cache, mirror=None, progress=False)
    upstream.write_bytes(GOOD[:-1] + b"!")          # the source changes, and the cached copy with it
    path.write_bytes(GOOD[:-1] + b"!")
    pin = pin_path(path)
    pin.write_text(pin.read_text()[:30])            # the pin is cut short
    with pytest.raises(DataFetchError, match="pin file .*big.txt.sha256 is damaged"):
        fetch(e, cache_dir=cache, mirror=None, progress=False)   # it returned the changed copy and re-pinned it
    assert pin.read_text() == f"{hashlib.sha256(GOOD).hexdigest()}  big.txt\n"[:30]   # left for the learner
    assert data.status(e, cache_dir=cache, mirror=None) == "corrupt"
    pin.unlink()
    assert fetch(e, cache_dir=cache, mirror=None, progress=False).read_bytes() == GOOD[:-1] + b"!"


def test_fetch_arguments_that_would_read_the_working_folder_or_hang_are_refused(tmp_path, upstream, monkeypatch):
    e = _entry(upstream.as_uri())
    monkeypatch.chdir(tmp_path)
    for kwargs, match in (({"cache_dir": ""}, "cache_dir is ''"), ({"mirror": "  "}, "mirror is '  '"),
                          ({"timeout": -1}, "timeout must be a finite number > 0"),
                          ({"timeout": float("nan")}, "timeout must be a finite number > 0")):
        with pytest.raises(ValueError, match=match):
            fetch(e, progress=False, **{"cache_dir": tmp_path / "c", "mirror": None, **kwargs})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.txt"]     # nothing written here
    with pytest.raises(TypeError, match="progress must be True or False"):
        fetch(e, cache_dir=tmp_path / "c", mirror=None, progress="no")
    with pytest.raises(TypeError, match="single name 'the-verdict'"):
        data.entries("the-verdict")
    with pytest.raises(TypeError, match="entry must be a DataFile"):
        data.register({"name": "x"})


def test_status_reads_a_cache_under_home_as_fetch_does(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    e = _entry(upstream.as_uri())
    fetch(e, cache_dir="~/cache", mirror=None, progress=False)
    assert data.status(e, cache_dir="~/cache", mirror=None) == "cached"    # "missing" before
