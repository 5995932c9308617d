"""The workspace the UI works in: ``runs/<name>/`` run folders, ``configs/`` example configs, the
registry in ``registry/``, and the UI's own bookkeeping in ``.lorakit-ui/`` (kept outside the run
folders, which ``lorakit train`` clears when it starts a run).

Every path the UI reads or writes is made here, from a validated name, and checked to lie inside
the workspace: a request can never name a file elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.config.schema import load_yaml
from lorakit.errors import LorakitError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
#: A run without a UI pid file counts as running while its log or checkpoints changed this recently.
ACTIVE_SECONDS = 120.0


class WorkspaceError(LorakitError):
    """A name or path the UI was given is not acceptable (bad characters, outside the workspace)."""


def check_name(name: str, what: str = "run name") -> str:
    """Return ``name`` when it is a plain folder name (letters, digits, ``. _ -``; no path).

    Raises:
        WorkspaceError: Anything else, e.g. ``../x`` or an empty name.
    """
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise WorkspaceError(
            f"{what} '{str(name)[:80]}': use letters, digits, '.', '_' and '-' (at most 80, "
            "starting with a letter or digit)"
        )
    return name


@dataclass
class Workspace:
    """Paths of one workspace folder."""

    root: Path
    #: Parsed run files by path, with the (mtime, size) they were read at: a run's config and
    #: metrics are written once, and parsing 200 YAML files per page view would take most of a second.
    _parsed: dict[Path, tuple[tuple[int, int], Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    def parsed(self, path: Path, reader: Callable[[Path], Any]) -> Any:
        """``reader(path)``, re-read only when the file changed (None when it is missing)."""
        try:
            st = path.stat()
        except OSError:
            self._parsed.pop(path, None)
            return None
        sig = (st.st_mtime_ns, st.st_size)
        hit = self._parsed.get(path)
        if hit is None or hit[0] != sig:
            hit = (sig, reader(path))
            self._parsed[path] = hit
        return hit[1]

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def state(self) -> Path:
        return self.root / ".lorakit-ui"

    def inside(self, path: Path) -> Path:
        """``path`` resolved, when it lies inside the workspace.

        Raises:
            WorkspaceError: It resolves (links followed) to somewhere outside.
        """
        resolved = Path(path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise WorkspaceError(f"'{path}' is outside the workspace {self.root}")
        return resolved

    def run_dir(self, name: str) -> Path:
        return self.inside(self.runs / check_name(name))

    def state_file(self, name: str, suffix: str) -> Path:
        return self.inside(self.state / f"{check_name(name)}{suffix}")

    def run_names(self) -> list[str]:
        """Folders of ``runs/`` that hold a run (a config.yaml), or that the UI started."""
        names = set()
        if self.runs.is_dir():
            names |= {
                p.name for p in self.runs.iterdir() if NAME.match(p.name) and (p / "config.yaml").is_file()
            }
        if self.state.is_dir():
            names |= {
                p.name.removesuffix(".json")
                for p in self.state.glob("*.json")
                if NAME.match(p.name.removesuffix(".json"))
            }
        return sorted(names)

    def example_configs(self) -> list[str]:
        """Names of the YAML configs in ``configs/`` (prefill choices of the new-run form)."""
        if not self.configs.is_dir():
            return []
        return sorted(p.name for p in self.configs.glob("*.yaml") if NAME.match(p.name))


# --------------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping as lorakit reads configs (empty when unreadable: shown, never a crash)."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def read_written_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping that ``yaml.safe_dump`` wrote (a run's config.yaml), parsed by libyaml when present.

    ``safe_dump`` quotes every string YAML 1.1 would read as a boolean (``'no'``), so the C loader
    reads these files exactly as :func:`~lorakit.config.schema.load_yaml` does, ~10x faster.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(
            path.read_text(encoding="utf-8"), Loader=loader
        )  # a SafeLoader: no arbitrary objects
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process that is not a zombie."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False
    try:  # a finished child not yet reaped is still "there" for kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class RunInfo:
    """One row of the runs table."""

    name: str
    path: Path
    status: str  # queued / running / finished / failed / interrupted / cancelled
    task: str = ""
    base_model: str = ""
    best_metric: str = ""
    best_value: float | None = None
    test_value: float | None = None
    seconds: float | None = None
    started: float | None = None  # epoch seconds
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    ui: dict[str, Any] = field(default_factory=dict)  # what the UI recorded when it started the run

    @property
    def started_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started)) if self.started else ""

    @property
    def resumed_text(self) -> str:
        """When the UI last resumed the run (its start time stays the first one)."""
        resumed = self.ui.get("resumed")
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(resumed)) if resumed else ""

    @property
    def duration_text(self) -> str:
        if self.seconds is None:
            return ""
        s = int(self.seconds)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_status(run: Path, ui: dict[str, Any], now: float | None = None) -> str:
    """queued / running / finished / failed / interrupted / cancelled, from the folder and the UI's record.

    A run with ``metrics.json`` and ``adapter/`` finished. A run the UI started is queued until it
    starts, then running while its process lives; afterwards its exit code decides (130: stopped,
    with a checkpoint; 2: an error lorakit reported, failed even with a checkpoint). A run started
    from the CLI counts as running while its log or checkpoints changed in the last two minutes;
    after that it was interrupted when it left a checkpoint, else it failed.
    """
    if (run / "metrics.json").is_file() and (run / "adapter").is_dir():
        return "finished"
    if ui.get("cancelled"):
        return "cancelled"
    if ui.get("queued") and not ui.get("pid"):
        return "queued"
    if ui.get("pid") and pid_alive(int(ui["pid"])) and ui.get("exit_code") is None:
        return "running"
    checkpointed = has_checkpoint(run)
    code = ui.get("exit_code")
    if code == 2:  # lorakit refused to go on (a user error): the same config fails again on resume
        return "failed"
    if code is not None:
        return "interrupted" if checkpointed or code in (130, -2, -15) else "failed"
    if ui.get("pid"):  # started by the UI, exit code unknown (the UI was restarted meanwhile)
        return "interrupted" if checkpointed else "failed"
    now = now or time.time()
    newest = max(
        (p.stat().st_mtime for p in [run / "train.log", run / "checkpoints"] if p.exists()), default=0.0
    )
    if now - newest < ACTIVE_SECONDS:
        return "running"
    return "interrupted" if checkpointed else "failed"


def has_checkpoint(run: Path) -> bool:
    """Whether the run folder holds a checkpoint to resume from."""
    return any((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else False


def read_run(ws: Workspace, name: str) -> RunInfo:
    """Everything the runs table and the run page show about run ``name``."""
    run = ws.run_dir(name)
    ui = read_json(ws.state_file(name, ".json")) or {}
    # train writes config.yaml once the data is read; until then the one the UI started it with
    started_with = ws.state_file(name, ".yaml")
    cfg = (
        ws.parsed(run / "config.yaml", read_written_yaml) or ws.parsed(started_with, read_written_yaml) or {}
    )
    metrics = ws.parsed(run / "metrics.json", read_json)
    metrics = metrics if isinstance(metrics, dict) else None
    log = run / "train.log"
    started = ui.get("started") or _first_log_time(log)
    info = RunInfo(
        name=name, path=run, status=run_status(run, ui), config=cfg, metrics=metrics, ui=ui, started=started
    )
    info.task = str(cfg.get("task", ""))
    info.base_model = (
        str((cfg.get("model") or {}).get("name_or_path", "")) if isinstance(cfg.get("model"), dict) else ""
    )
    if metrics:
        info.best_metric = str(metrics.get("best_metric", ""))
        info.best_value = _num(metrics.get("best_value"))
        test = metrics.get("test") or {}
        info.test_value = _num(test.get(info.best_metric)) if isinstance(test, dict) else None
        info.seconds = _num(metrics.get("seconds"))
    elif started:
        info.seconds = (time.time() if info.status == "running" else _mtime(log) or started) - started
    return info


def list_runs(ws: Workspace) -> list[RunInfo]:
    return [read_run(ws, name) for name in ws.run_names()]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _first_log_time(log: Path) -> float | None:
    """The time stamp of the first line of train.log (``2026-11-30 09:01:02,345 INFO ...``)."""
    try:
        with log.open(encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
    except OSError:
        return None
    try:
        return time.mktime(time.strptime(first[:19], "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return None
