"""Content hashes: of one file, of a folder (the registry's and the exports' ``content_hash``), and the
streaming update that base-model fingerprints are built from."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHUNK = 1 << 22  # 4 MiB reads: weight files are hashed without holding them in memory


def update_with_file(h: Any, path: Path) -> None:
    """Feed the bytes of ``path`` into the hash object ``h``, a chunk at a time."""
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)


def file_sha256(path: Path) -> str:
    """The hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    update_with_file(h, path)
    return h.hexdigest()


def hash_tree(folder: Path) -> tuple[str, dict[str, tuple[str, int]]]:
    """Content hash of a folder: sha256 over the sorted ``<sha256>  <relative path>`` lines of its files.

    Returns:
        ``("sha256:<hex>", {relative path: (sha256, size)})``.
    """
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            files[p.relative_to(folder).as_posix()] = (file_sha256(p), p.stat().st_size)
    listing = "".join(f"{h}  {rel}\n" for rel, (h, _) in files.items())
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest(), files
