"""Checks of a cache root's soundness, shared by the reliability tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ociregistry.manifest import Manifest


def assert_cache_sound(root: Path) -> None:
    """Check every blob hashes to its name and every record verifies."""
    for path in (root / "blobs").iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == path.name, f"corrupt blob {path}"
    for folder in ("img", "lts"):
        for path in (root / folder).iterdir():
            record = Manifest.from_record(path.read_bytes())
            assert record.hex == path.name, f"record {path} is named wrongly"
