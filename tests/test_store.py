"""Unit tests of the cache root: atomic blobs, manifest records, locks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ociregistry.errors import DigestInvalid
from ociregistry.manifest import OCI_IMAGE, Manifest, sha256_digest
from ociregistry.store import Store

DATA = b"layer bytes " * 1000
HEX = hashlib.sha256(DATA).hexdigest()
MANIFEST = (
    b'{"schemaVersion":2,"mediaType":"%s","config":{},"layers":[]}' % OCI_IMAGE.encode()
)


def make_manifest(data: bytes = MANIFEST) -> Manifest:
    return Manifest(sha256_digest(data), OCI_IMAGE, data, [])


def test_verified_blob_is_committed_by_rename(tmp_path: Path):
    store = Store(str(tmp_path))
    writer = store.new_blob_writer(HEX)

    writer.write(DATA[:100])
    assert not store.has_blob(HEX)
    writer.write(DATA[100:])
    path = writer.commit(len(DATA))

    assert Path(path).read_bytes() == DATA
    assert os.listdir(tmp_path / ".tmp") == []


@pytest.mark.parametrize(
    ("payload", "size"),
    [(DATA[:-1], len(DATA)), (DATA[:-1] + b"X", len(DATA)), (DATA, len(DATA) + 1)],
)
def test_blob_that_fails_verification_leaves_nothing(tmp_path: Path, payload, size):
    store = Store(str(tmp_path))
    writer = store.new_blob_writer(HEX)
    writer.write(payload)

    with pytest.raises(DigestInvalid):
        writer.commit(size)

    assert not store.has_blob(HEX)
    assert os.listdir(tmp_path / ".tmp") == []


def test_manifest_record_goes_to_img_or_lts_by_tag(tmp_path: Path):
    store = Store(str(tmp_path))

    store.put_manifest(make_manifest(), "r.io/x:1")
    store.put_manifest(make_manifest(), "r.io/x:latest")

    hex_digest = sha256_digest(MANIFEST)[7:]
    assert (tmp_path / "img" / hex_digest).exists()
    assert (tmp_path / "lts" / hex_digest).exists()
    assert store.find_manifest("r.io/x:1").data == MANIFEST
    assert store.find_manifest("r.io/x:latest").data == MANIFEST


def test_records_written_by_another_store_are_found(tmp_path: Path):
    reader = Store(str(tmp_path))
    reader.load_index()
    writer = Store(str(tmp_path))

    writer.put_manifest(make_manifest(), "r.io/x:1")

    assert reader.find_manifest("r.io/x:1") is not None


def test_tag_moved_to_new_digest_drops_the_old_record(tmp_path: Path):
    store = Store(str(tmp_path))
    other = MANIFEST.replace(b"[]", b"[ ]")
    store.put_manifest(make_manifest(), "r.io/x:1")

    store.put_manifest(make_manifest(other), "r.io/x:1")

    assert store.find_manifest("r.io/x:1").data == other
    assert sorted(os.listdir(tmp_path / "img")) == [sha256_digest(other)[7:]]


def test_index_survives_a_restart(tmp_path: Path):
    Store(str(tmp_path)).put_manifest(make_manifest(), "r.io/x:1")

    store = Store(str(tmp_path))

    assert store.load_index() == 1
    assert store.find_manifest("r.io/x:1").digest == sha256_digest(MANIFEST)


def test_unreadable_record_is_skipped(tmp_path: Path):
    store = Store(str(tmp_path))
    (tmp_path / "img" / ("0" * 64)).write_bytes(b"{truncated")

    assert store.load_index() == 0


def test_lock_is_exclusive_across_processes_and_freed_by_death(tmp_path: Path):
    store = Store(str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not store.lock("blob:x").try_acquire()
    finally:
        holder.kill()
        holder.wait(timeout=10)

    lock = store.lock("blob:x")
    assert lock.try_acquire()
    lock.release()


HOLD_LOCK = """
import sys, time
from ociregistry.store import Store
lock = Store(sys.argv[1]).lock("blob:x")
assert lock.try_acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_temp_files_of_dead_processes_are_cleaned(tmp_path: Path):
    store = Store(str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = Path(
        store.temp_path(HEX).replace(f".{os.getpid()}.", f".{dead.stdout.strip()}.")
    )
    orphan.write_bytes(b"partial")
    mine = Path(store.temp_path(HEX))
    mine.write_bytes(b"in progress")

    assert store.clean_temp() == 1

    assert not orphan.exists()
    assert mine.exists()
