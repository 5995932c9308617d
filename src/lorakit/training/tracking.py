"""Experiment trackers: a run's config, curves, final metrics and files sent to MLflow or W&B.

``output.report_to`` names the trackers with the words transformers uses (tensorboard, mlflow,
wandb). Each is a :class:`~lorakit.training.events.Callback`; what each one records:

    on_start   the resolved config as params (dotted keys: ``lora.r``, ``train.learning_rate``, ...)
    on_log     train/loss, train/lr at the optimizer step
    on_eval    validation/<metric> at the optimizer step
    on_end     test/<metric> and best_validation/<metric>; adapter/ and report/ as artifacts

MLflow writes where ``MLFLOW_TRACKING_URI`` points, else to ``sqlite:///mlflow.db`` in the working
folder (artifacts beside it in ``mlartifacts/``): no server needed. W&B runs offline (files under
``<run>/wandb``, ``wandb sync`` uploads them later) unless an API key is set. :func:`check_reachable`
is called before the run folder is touched, so an unreachable server is a one-line error, not a
traceback after the first epoch.

:class:`HistoryFile` is not a tracker: it appends each row to ``<run>/history.jsonl`` as it comes, so
that another process (``lorakit tune``) can follow a run while it trains.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorakit.errors import LorakitError
from lorakit.training.events import Callback

log = logging.getLogger("lorakit")

#: A parent MLflow run id; set by ``lorakit tune`` so that each trial's run is logged as its child.
PARENT_RUN_ENV = "LORAKIT_MLFLOW_PARENT_RUN_ID"
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"
DEFAULT_MLFLOW_ARTIFACTS = "mlartifacts"
INSTALL_HINT = "pip install 'lorakit[track]'"


class TrackerError(LorakitError):
    """A tracker named in ``output.report_to`` is not installed or cannot be reached."""


# --------------------------------------------------------------------------------------------------
# Checks and construction
# --------------------------------------------------------------------------------------------------


def mlflow_uri() -> str:
    """The MLflow tracking URI in use: ``MLFLOW_TRACKING_URI``, else a SQLite file in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI


def wandb_mode() -> str:
    """``WANDB_MODE`` when set, else online with an API key (``WANDB_API_KEY``) and offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def check_reachable(report_to: list[str], timeout: float = 5.0) -> None:
    """Make sure every remote tracker answers before a run starts.

    Args:
        report_to: Tracker names (``output.report_to``).
        timeout: Seconds to wait for each server.

    Raises:
        TrackerError: A tracker server (MLflow over http(s), W&B online) does not answer.
    """
    if "mlflow" in report_to:
        uri = mlflow_uri()
        if urlparse(uri).scheme in ("http", "https"):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
            except urllib.error.HTTPError:
                pass  # the server answered (an auth or routing error is MLflow's to report in detail)
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise TrackerError(
                    f"output.report_to: mlflow: the tracking server {uri} (MLFLOW_TRACKING_URI) "
                    f"cannot be reached ({reason}); start it, fix the URI, or unset it to log to "
                    f"{DEFAULT_MLFLOW_URI}"
                ) from None
    if "wandb" in report_to and wandb_mode() == "online":
        base = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
        port = base.port or (443 if base.scheme == "https" else 80)
        try:
            socket.create_connection((base.hostname or "", port), timeout=timeout).close()
        except OSError as exc:
            raise TrackerError(
                f"output.report_to: wandb: {base.geturl()} cannot be reached "
                f"({exc.strerror or exc}); set WANDB_MODE=offline to log locally and `wandb sync` "
                "later"
            ) from None


def make_trackers(report_to: list[str], *, experiment: str, run_name: str) -> list[Callback]:
    """The callbacks of the trackers in ``report_to`` (TensorBoard is written by the training loop itself).

    Raises:
        TrackerError: A tracker is not installed or its server cannot be reached.
    """
    check_reachable(report_to)
    out: list[Callback] = []
    if "mlflow" in report_to:
        out.append(MLflowTracker(experiment=experiment, run_name=run_name))
    if "wandb" in report_to:
        out.append(WandbTracker(project=experiment, run_name=run_name))
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": "8"}``; lists and None as JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def _guarded(method: Any) -> Any:
    """A tracker that fails mid-run (server gone, disk full) warns once and stops logging; training
    goes on.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.broken = True
            log.warning(
                "%s: logging stopped after an error (%s); training goes on",
                self.name,
                " ".join(str(exc).split())[:300],
            )
            return None

    return wrapper


def _scalars(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------


def mlflow_client() -> tuple[Any, str]:
    """An ``MlflowClient`` on :func:`mlflow_uri` and that URI.

    Raises:
        TrackerError: mlflow is not installed.
    """
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackerError(f"output.report_to: mlflow is not installed; {INSTALL_HINT}") from None
    uri = mlflow_uri()
    return MlflowClient(tracking_uri=uri), uri


def mlflow_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (a local store keeps artifacts in
    ./mlartifacts).
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local = urlparse(uri).scheme == "sqlite"
    try:
        return client.create_experiment(
            name, artifact_location=Path(DEFAULT_MLFLOW_ARTIFACTS).resolve().as_uri() if local else None
        )
    except MlflowException:  # another process (a parallel tune worker) created it first
        return client.get_experiment_by_name(name).experiment_id


class MLflowTracker(Callback):
    """Logs a run to MLflow: config as params, curves and final metrics, adapter/ and report/ as artifacts."""

    name, broken = "mlflow", False

    def __init__(self, *, experiment: str, run_name: str) -> None:
        self.client, self.uri = mlflow_client()
        self.experiment, self.run_name = experiment, run_name
        self.run_id: str | None = None
        self.finished = False

    @_guarded
    def on_start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        from mlflow.entities import Param

        tags = {
            "lorakit.run_dir": str(Path(run_dir).resolve()),
            **{f"lorakit.{k}": str(v) for k, v in info.items()},
        }
        if os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
        exp = mlflow_experiment(self.client, self.experiment, self.uri)
        self.run_id = self.client.create_run(exp, run_name=self.run_name, tags=tags).info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    @_guarded
    def on_log(self, row: dict[str, Any]) -> None:
        self._metrics({"train/loss": row["loss"], "train/lr": row["lr"]}, row["step"])

    @_guarded
    def on_eval(self, row: dict[str, Any]) -> None:
        skip = {"step", "epoch", "split", "seconds"}
        self._metrics({f"validation/{k}": v for k, v in _scalars(row).items() if k not in skip}, row["step"])

    @_guarded
    def on_end(self, run_dir: Path, final: dict[str, Any]) -> None:
        values = {f"best_validation/{k}": v for k, v in _scalars(final.get("validation")).items()}
        values |= {f"test/{k}": v for k, v in _scalars(final.get("test")).items()}
        self._metrics(values, int(final.get("steps") or 0))
        for folder in ("adapter", "report"):
            if (Path(run_dir) / folder).is_dir():
                self.client.log_artifacts(self.run_id, str(Path(run_dir) / folder), folder)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    @_guarded
    def close(self) -> None:
        if self.run_id is not None and not self.finished:
            self.client.set_terminated(self.run_id, "FAILED")


def end_child_runs(parent_run_id: str, run_dir: Path, status: str) -> None:
    """Close the still-running MLflow runs a killed training process left (child of ``parent_run_id``,
    tagged with ``run_dir``) with ``status``, e.g. KILLED for a pruned trial."""
    client, _ = mlflow_client()
    experiment = client.get_run(parent_run_id).info.experiment_id
    where = (
        f"tags.mlflow.parentRunId = '{parent_run_id}' and "
        f"tags.`lorakit.run_dir` = '{Path(run_dir).resolve()}' and attributes.status = 'RUNNING'"
    )
    for run in client.search_runs([experiment], filter_string=where):
        client.set_terminated(run.info.run_id, status)


# --------------------------------------------------------------------------------------------------
# Weights & Biases
# --------------------------------------------------------------------------------------------------


class WandbTracker(Callback):
    """Logs a run to W&B (offline without an API key): config, curves, summary, adapter and report
    artifacts.
    """

    name, broken = "wandb", False

    def __init__(self, *, project: str, run_name: str) -> None:
        try:
            import wandb
        except ImportError:
            raise TrackerError(f"output.report_to: wandb is not installed; {INSTALL_HINT}") from None
        self.wandb, self.project, self.run_name = wandb, project, run_name
        self.run: Any = None
        self.finished = False

    @_guarded
    def on_start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        self.run = self.wandb.init(
            project=self.project,
            name=self.run_name,
            dir=str(run_dir),
            config=config,
            mode=wandb_mode(),
            notes=json.dumps(info, default=str),
            reinit="create_new",
        )

    @_guarded
    def on_log(self, row: dict[str, Any]) -> None:
        self.run.log({"train/loss": row["loss"], "train/lr": row["lr"]}, step=row["step"])

    @_guarded
    def on_eval(self, row: dict[str, Any]) -> None:
        skip = {"step", "epoch", "split", "seconds"}
        self.run.log(
            {f"validation/{k}": v for k, v in _scalars(row).items() if k not in skip}, step=row["step"]
        )

    @_guarded
    def on_end(self, run_dir: Path, final: dict[str, Any]) -> None:
        self.run.summary.update(
            {f"best_validation/{k}": v for k, v in _scalars(final.get("validation")).items()}
            | {f"test/{k}": v for k, v in _scalars(final.get("test")).items()}
        )
        for folder, kind in (("adapter", "model"), ("report", "report")):
            if (Path(run_dir) / folder).is_dir():
                art = self.wandb.Artifact(f"{self.run_name}-{folder}", type=kind)
                art.add_dir(str(Path(run_dir) / folder))
                self.run.log_artifact(art)
        self.run.finish()
        self.finished = True

    @_guarded
    def close(self) -> None:
        if self.run is not None and not self.finished:
            self.run.finish(exit_code=1)


# --------------------------------------------------------------------------------------------------
# The live history file
# --------------------------------------------------------------------------------------------------


class HistoryFile(Callback):
    """Appends every train / validation row to ``<run>/history.jsonl`` as it is logged.

    The training loop rewrites the file whole (atomically) when the run completes, so rows repeated
    after a resume from an earlier checkpoint do not stay in the finished run's history.
    """

    def __init__(self) -> None:
        self.fh: Any = None

    def on_start(self, run_dir: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
        self.fh = open(Path(run_dir) / "history.jsonl", "a", encoding="utf-8")  # noqa: SIM115  (held for the run)

    def _write(self, row: dict[str, Any]) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()

    on_log = on_eval = _write  # type: ignore[assignment]

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
