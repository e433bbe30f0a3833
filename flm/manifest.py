"""checkpoint.json, the manifest that makes a checkpoint directory complete: written last, it lists every file's size
and (up to a size) sha256, so a reader can tell a finished checkpoint from a partial or corrupted one. Shared by every
checkpoint format (flm/checkpoint.py, flm/sharded.py, flm/offline_growth.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "checkpoint.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path, hash_limit: int = 64 << 20) -> None:
    """checkpoint.json: size of every file below `directory`, sha256 of those up to `hash_limit` bytes (hashing
    terabytes of shards would take longer than writing them); files fsynced first. Written last."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {}
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        size = p.stat().st_size
        manifest[str(p.relative_to(directory))] = {"bytes": size, "sha256": sha256(p) if size <= hash_limit else None}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
