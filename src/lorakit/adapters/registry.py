"""A local, versioned registry of adapters: a folder of immutable copies and an SQLite index.

Layout of a registry root::

    index.sqlite                 versions (name, version, content hash, task, base, metrics, ...)
                                 and files (sha256 and size of every stored file)
    adapters/<name>/v<N>/        the adapter directory as published, files read-only

``publish`` copies the adapter into a hidden staging folder, hashes the copy, then inside one
``BEGIN IMMEDIATE`` transaction (which SQLite serialises across processes) picks the next version,
renames the staging folder into place and inserts the rows. Two processes publishing at once get
different versions and an intact index; a crash between the rename and the commit leaves a folder
the next publish of that version replaces. ``pull`` re-hashes every file against the index, so a
weight file changed after publishing is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.adapters.folder import find_adapter_dir, read_metadata
from lorakit.errors import DiskFullError, LorakitError
from lorakit.files.atomic import atomic_dir, now_iso
from lorakit.files.diskspace import is_no_space
from lorakit.files.hashing import hash_tree
from lorakit.files.outputs import check_output_folder

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, content_hash TEXT NOT NULL, task TEXT,
    base_model TEXT, base_fingerprint TEXT, metric TEXT, metrics TEXT, created_at TEXT,
    size INTEGER, source TEXT, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY (name, version, path));
"""


class RegistryError(LorakitError):
    """A registry name or reference is invalid, unknown, or a stored version is damaged."""


def default_root() -> Path:
    """``$LORAKIT_REGISTRY``, else ``$XDG_DATA_HOME/lorakit/registry`` (``~/.local/share/...``)."""
    if os.environ.get("LORAKIT_REGISTRY"):
        return Path(os.environ["LORAKIT_REGISTRY"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "lorakit" / "registry"


def check_name(name: str) -> str:
    """Validate an adapter name: lower-case letters, digits, ``.``, ``_``, ``-``; no paths.

    Raises:
        RegistryError: The name could escape the registry folder or is not portable.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"adapter name {name!r} is not valid: use 1-64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. imdb-minilm)"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` (latest version), ``name:3`` or ``name:v3`` -> (name, version or None).

    Raises:
        RegistryError: Not a valid reference.
    """
    name, sep, ver = str(ref).partition(":")
    check_name(name)
    if not sep:
        return name, None
    digits = ver[1:] if ver.startswith("v") else ver
    if not digits.isdigit() or int(digits) < 1:
        raise RegistryError(
            f"registry reference {ref!r}: the version must be a positive number, e.g. {name}:1 or {name}:v1"
        )
    return name, int(digits)


@dataclass
class Version:
    """One published version of an adapter."""

    name: str
    version: int
    content_hash: str
    task: str
    base_model: str
    base_fingerprint: str
    metric: str  # the headline metric, e.g. "test accuracy 0.8850"
    metrics: dict[str, Any]
    created_at: str
    size: int
    source: str
    path: Path
    files: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "content_hash": self.content_hash,
            "task": self.task,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "metric": self.metric,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "size": self.size,
            "source": self.source,
            "path": str(self.path),
            "files": {k: {"sha256": h, "size": s} for k, (h, s) in self.files.items()},
        }


def headline_metric(meta: dict[str, Any]) -> str:
    """The metric the run selected on, from the test split when there is one (else validation)."""
    from lorakit.tasks import get_task

    metrics = meta.get("metrics") or {}
    name = (meta.get("config", {}).get("train", {}) or {}).get("metric_for_best")
    with contextlib.suppress(LorakitError):
        name = name or get_task(meta.get("task", "")).default_metric
    for split in ("test", "validation"):
        values = metrics.get(split) or {}
        if name in values and isinstance(values[name], (int, float)):
            return f"{split} {name} {values[name]:.4f}"
    return "-"


def _read_only(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _writable(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def _remove(folder: Path) -> None:
    if folder.exists():
        _writable(folder)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _removed_at_exit(folder: Path) -> Iterator[Path]:
    """``folder``, removed on the way out whatever happened (once renamed into place it is gone)."""
    try:
        yield folder
    finally:
        _remove(folder)


def _stage(src: Path, staging: Path) -> tuple[str, dict[str, tuple[str, int]]]:
    """Copy an adapter folder (hidden files left out) to ``staging``, read-only; its content hash and
    files, as :func:`hash_tree` gives them."""
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns(".*"))
    content_hash, files = hash_tree(staging)
    _read_only(staging)
    return content_hash, files


@contextlib.contextmanager
def _immediate(con: sqlite3.Connection) -> Iterator[None]:
    """A write transaction taken at its start (``BEGIN IMMEDIATE``, which SQLite serialises across
    processes): committed when the block ends, rolled back when it raises."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise


def _insert_version(
    con: sqlite3.Connection,
    name: str,
    version: int,
    meta: dict[str, Any],
    src: Path,
    content_hash: str,
    files: dict[str, tuple[str, int]],
) -> None:
    """The index rows of a new version: one in ``versions``, one per stored file in ``files``."""
    base = meta.get("base_model", {})
    con.execute(
        "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            name,
            version,
            content_hash,
            meta.get("task"),
            base.get("name_or_path"),
            base.get("fingerprint"),
            headline_metric(meta),
            json.dumps(meta.get("metrics") or {}),
            now_iso(),
            sum(s for _, s in files.values()),
            str(src.resolve()),
        ),
    )
    con.executemany(
        "INSERT INTO files VALUES (?,?,?,?,?)", [(name, version, rel, h, s) for rel, (h, s) in files.items()]
    )


class Registry:
    """A registry rooted at a folder (created on first publish).

    Example:
        >>> reg = Registry()                       # $LORAKIT_REGISTRY or ~/.local/share/lorakit/registry
        >>> v = reg.publish("runs/imdb-minilm", "imdb-minilm").version
        >>> reg.pull("imdb-minilm:1", to="imdb-adapter")
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_root()
        self.index = self.root / "index.sqlite"

    # ---- storage ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _db(self, *, create: bool = False) -> Iterator[sqlite3.Connection]:
        if not self.index.is_file() and not create:
            raise RegistryError(
                f"no registry at '{self.root}'; publish an adapter first "
                "(lorakit publish ADAPTER_DIR --name NAME) or pass --registry"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.index, timeout=60, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(
                f"cannot open the registry at '{self.root}' ({exc}); pass a writable --registry folder"
            ) from None
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout = 60000")
            if create:
                con.executescript(_SCHEMA)
            yield con
        except sqlite3.DatabaseError as exc:
            raise RegistryError(
                f"the registry index '{self.index}' cannot be used ({exc}); restore it or "
                "start a new --registry"
            ) from None
        finally:
            con.close()

    def _version_dir(self, name: str, version: int) -> Path:
        return self.root / "adapters" / name / f"v{version}"

    def _row_to_version(self, con: sqlite3.Connection, row: sqlite3.Row) -> Version:
        files = {
            r["path"]: (r["sha256"], r["size"])
            for r in con.execute(
                "SELECT path, sha256, size FROM files WHERE name=? AND version=? ORDER BY path",
                (row["name"], row["version"]),
            )
        }
        return Version(
            row["name"],
            row["version"],
            row["content_hash"],
            row["task"] or "",
            row["base_model"] or "",
            row["base_fingerprint"] or "",
            row["metric"] or "-",
            json.loads(row["metrics"] or "{}"),
            row["created_at"] or "",
            row["size"] or 0,
            row["source"] or "",
            self._version_dir(row["name"], row["version"]),
            files,
        )

    # ---- publish ----------------------------------------------------------------------------------
    def publish(self, adapter: str | Path, name: str) -> tuple[Version, bool]:
        """Store an immutable copy of an adapter as the next version of ``name``.

        Args:
            adapter: An adapter directory or a run directory holding ``adapter/``.
            name: The registry name (see :func:`check_name`).

        Returns:
            The version, and whether it is new (False: the same content was already the version returned).

        Raises:
            RegistryError: Bad name or unusable registry folder.
            DiskFullError: The device filled up (the index and earlier versions are intact).
            AdapterError: Not a complete lorakit adapter (from :func:`find_adapter_dir`).
        """
        check_name(name)
        src = find_adapter_dir(adapter)
        meta = read_metadata(src)
        staging = self.root / "adapters" / f".incoming-{uuid.uuid4().hex[:12]}"
        with self._db(create=True) as con, self._storage_errors(src), _removed_at_exit(staging):
            content_hash, files = _stage(src, staging)
            with _immediate(con):  # one publisher at a time picks a version number
                same = con.execute(
                    "SELECT * FROM versions WHERE name=? AND content_hash=? ORDER BY version DESC",
                    (name, content_hash),
                ).fetchone()
                if same is not None:
                    return self._row_to_version(con, same), False
                version = (
                    con.execute("SELECT MAX(version) FROM versions WHERE name=?", (name,)).fetchone()[0] or 0
                ) + 1
                target = self._version_dir(name, version)
                _remove(target)  # left by a publish that crashed before its commit
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, target)
                _insert_version(con, name, version, meta, src, content_hash, files)
            row = con.execute("SELECT * FROM versions WHERE name=? AND version=?", (name, version)).fetchone()
            return self._row_to_version(con, row), True

    @contextlib.contextmanager
    def _storage_errors(self, src: Path) -> Iterator[None]:
        """A full disk or an unwritable registry folder while publishing ``src``, as one-line errors
        (other index errors go on to :meth:`_db`)."""
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            if is_no_space(exc):
                raise DiskFullError(
                    f"no space left on the device while publishing '{src}' to the registry at "
                    f"'{self.root}'; its index and earlier versions are intact: free some space and "
                    "publish again"
                ) from None
            if not isinstance(exc, OSError):
                raise
            raise RegistryError(
                f"cannot store '{src}' in the registry at '{self.root}' "
                f"({exc.strerror or exc}); pass a writable --registry folder"
            ) from None

    # ---- read -------------------------------------------------------------------------------------
    def list(self, name: str | None = None) -> list[Version]:
        """All versions (of ``name`` when given), by name then version."""
        if not self.index.is_file():
            return []
        with self._db() as con:
            if name is None:
                rows = con.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
            else:
                rows = con.execute(
                    "SELECT * FROM versions WHERE name=? ORDER BY version", (check_name(name),)
                ).fetchall()
            return [self._row_to_version(con, r) for r in rows]

    def get(self, ref: str) -> Version:
        """The version a reference names (``name`` = its latest version).

        Raises:
            RegistryError: Unknown name or version.
        """
        name, version = parse_ref(ref)
        with self._db() as con:
            if version is None:
                row = con.execute(
                    "SELECT * FROM versions WHERE name=? ORDER BY version DESC", (name,)
                ).fetchone()
            else:
                row = con.execute(
                    "SELECT * FROM versions WHERE name=? AND version=?", (name, version)
                ).fetchone()
            if row is None:
                known = [
                    f"{r['name']}:{r['version']}"
                    for r in con.execute(
                        "SELECT name, version FROM versions WHERE name=? ORDER BY version", (name,)
                    )
                ]
                hint = f"known versions: {', '.join(known)}" if known else "see `lorakit registry list`"
                raise RegistryError(f"'{ref}' is not in the registry at '{self.root}'; {hint}")
            return self._row_to_version(con, row)

    def verify(self, ref: str) -> Version:
        """Re-hash a stored version against the index.

        Raises:
            RegistryError: A file is missing, added or changed since publishing.
        """
        v = self.get(ref)
        if not v.path.is_dir():
            raise RegistryError(
                f"registry: {v.ref} is damaged: its folder '{v.path}' is missing; "
                f"delete it (lorakit registry delete {v.ref}) and publish again"
            )
        _, found = hash_tree(v.path)
        for rel, (h, _) in v.files.items():
            if rel not in found:
                raise RegistryError(
                    f"registry: {v.ref} is damaged: {rel} is missing; "
                    f"delete it (lorakit registry delete {v.ref}) and publish again"
                )
            if found[rel][0] != h:
                raise RegistryError(
                    f"registry: {v.ref} was tampered with: {rel} has hash sha256:{found[rel][0][:16]}… "
                    f"but was published as sha256:{h[:16]}…; "
                    f"delete it (lorakit registry delete {v.ref}) and publish again"
                )
        extra = sorted(set(found) - set(v.files))
        if extra:
            raise RegistryError(
                f"registry: {v.ref} was tampered with: {extra[0]} was added after publishing; "
                f"delete it (lorakit registry delete {v.ref}) and publish again"
            )
        return v

    def pull(self, ref: str, to: str | Path | None = None, *, overwrite: bool = False) -> Path:
        """Verify a version and return its folder, or copy it to ``to`` (atomically).

        Raises:
            RegistryError: Unknown or damaged version, or ``to`` exists without ``overwrite``.
        """
        v = self.verify(ref)
        if to is None:
            return v.path
        dest = check_output_folder(to, overwrite=overwrite, error=RegistryError)
        with atomic_dir(dest) as tmp:
            for rel in v.files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(v.path / rel, tmp / rel)
            _, copied = hash_tree(tmp)
            if {k: h for k, (h, _) in copied.items()} != {k: h for k, (h, _) in v.files.items()}:
                raise RegistryError(
                    f"registry: {v.ref} changed while it was being copied to '{dest}'; pull again"
                )
        return dest

    # ---- delete -----------------------------------------------------------------------------------
    def delete(self, ref: str, *, all_versions: bool = False) -> list[Version]:
        """Delete one version (``name:N``) or, with ``all_versions``, every version of ``name``.

        Raises:
            RegistryError: Unknown reference, or a bare name without ``all_versions``.
        """
        name, version = parse_ref(ref)
        if version is None and not all_versions:
            raise RegistryError(
                f"'{ref}' names every version of {name}; delete one with {name}:N or all with --all"
            )
        gone = self.list(name) if version is None else [self.get(ref)]
        if not gone:
            raise RegistryError(
                f"'{ref}' is not in the registry at '{self.root}'; see `lorakit registry list`"
            )
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            for v in gone:
                con.execute("DELETE FROM files WHERE name=? AND version=?", (v.name, v.version))
                con.execute("DELETE FROM versions WHERE name=? AND version=?", (v.name, v.version))
            con.execute("COMMIT")
        for v in gone:
            _remove(v.path)
        with contextlib.suppress(OSError):
            (self.root / "adapters" / name).rmdir()  # only when empty
        return gone
