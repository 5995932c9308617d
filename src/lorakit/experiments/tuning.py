"""`lorakit tune`: a hyperparameter search over any config key, built on Optuna.

    tune: section ─► Optuna study (TPE sampler, median / successive-halving pruner, stored on disk)
      each trial: params sampled ─► `lorakit train base.yaml --set key=value ...` in its own process
        its history.jsonl is followed while it trains: each validation is reported to Optuna,
        a trial the pruner stops is killed (PRUNED); a crash or NaN is FAILED and the study goes on
      end: trials.csv, best.yaml (a ready run config), report/index.html (Optuna's plotly plots)

The study folder is ``output.dir`` of the tune config: ``trial-NNN/`` run folders (``lorakit
train``'s usual layout), ``logs/trial-NNN.log``, ``base.yaml`` (the config every trial starts from),
and the study storage ``study.journal`` (Optuna's journal file). Run the same command again after an
interrupt and the study goes on where it stopped; run it in several processes (or on several
machines with ``tune.storage`` naming one database, e.g. ``postgresql://...``) and they share the
trials: Optuna hands each trial to exactly one process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorakit.config.loading import apply_overrides, load_config, validate_config
from lorakit.config.schema import RunConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.files import atomic
from lorakit.training.tracking import PARENT_RUN_ENV

log = logging.getLogger("lorakit")

JOURNAL = "study.journal"


# --------------------------------------------------------------------------------------------------
# The tune: section
# --------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SearchDim(_Strict):
    """One searched config key: a float or int range, or a list of choices."""

    low: float | None = Field(None, description="Smallest value of a range.")
    high: float | None = Field(None, description="Largest value of a range (included).")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates).")
    integer: bool = Field(False, description="Whole numbers only (ranks, epochs); `step` sets the spacing.")
    step: float | None = Field(
        None, gt=0, description="Spacing of the values of a range, e.g. 8 for r in 8, 16, 24, ..."
    )
    choices: list[Any] | None = Field(
        None,
        min_length=1,
        description="The values to choose from (anything a config key takes: numbers, strings, lists "
        "such as target-module sets or lora.layers).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDim:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high (a range) or choices (a list)")
        if self.low is not None and self.high is not None:
            if self.low > self.high:
                raise ValueError(f"low {self.low} is above high {self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"log: true needs low > 0 (got {self.low})")
            if self.log and self.step is not None:
                raise ValueError("log and step exclude each other (Optuna samples a log range continuously)")
        return self


class TuneConfig(_Strict):
    """The search: which keys, which metric, how many trials, how to prune."""

    space: dict[str, SearchDim] = Field(
        min_length=1,
        description="Dotted config keys and their ranges or choices, e.g. "
        "{train.learning_rate: {low: 1e-4, high: 1e-2, log: true}, lora.r: {choices: [4, 8, 16]}}.",
    )
    metric: str | None = Field(
        None,
        description="Validation metric to optimise; unset = train.metric_for_best (else the task's "
        "default). Trials select their best adapter on it too.",
    )
    direction: Literal["maximize", "minimize"] | None = Field(
        None,
        description="Unset = train.greater_is_better, else minimize for losses and perplexity and "
        "maximize otherwise.",
    )
    n_trials: int | None = Field(
        None,
        ge=1,
        description="Trials in the whole study, over every run and process (finished, pruned and failed "
        "ones count; interrupted ones do not).",
    )
    timeout_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop starting trials after this many minutes of this process; at least one of "
        "n_trials and timeout_minutes is needed.",
    )
    pruner: Literal["median", "successive-halving", "none"] = Field(
        "median",
        description="Stop poor trials early from their intermediate validations (train.eval_every_steps "
        "gives more of them): `median` stops a trial worse than the median of earlier trials at the "
        "same step, `successive-halving` keeps the top 1/reduction_factor at each rung.",
    )
    startup_trials: int = Field(
        4, ge=0, description="Median pruner: trials that run to the end before any is pruned."
    )
    warmup_evals: int = Field(
        1, ge=0, description="Median pruner: validations of a trial before it can be pruned."
    )
    reduction_factor: int = Field(
        3, ge=2, description="Successive halving: 1 in this many trials is promoted at each rung."
    )
    seed: int | None = Field(
        42,
        description="Seed of the TPE sampler; trial n samples with seed + n, so processes sharing a "
        "study propose different values and a study can be repeated (null = random).",
    )
    storage: str | None = Field(
        None,
        description="Where the study is stored: a database URL (sqlite:///study.db, "
        "postgresql://user@host/db) shared by processes on several machines, or a journal "
        "file path; unset = <output.dir>/study.journal.",
    )
    study_name: str | None = Field(
        None, description="Name of the study in the storage; unset = the last part of output.dir."
    )

    @model_validator(mode="after")
    def _budget(self) -> TuneConfig:
        if self.n_trials is None and self.timeout_minutes is None:
            raise ValueError("tune: give n_trials and/or timeout_minutes (the search needs an end)")
        return self

    def decode_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's stored params back as config values (list choices from their JSON text)."""
        out = {}
        for key, value in params.items():
            dim = self.space.get(key)
            if (
                dim is not None
                and dim.choices is not None
                and isinstance(value, str)
                and value not in dim.choices
            ):
                value = json.loads(value)
            out[key] = value
        return out


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, TuneConfig]:
    """Read a run config with a ``tune:`` section and check the search against the run config.

    Every value of the search space is tried on the config (the lows, highs and each choice), so a
    misspelt key or an impossible value is reported at load, not in the middle of the study.

    Raises:
        ConfigError: Every problem of the run config and the tune section at once.
    """
    cfg = load_config(path, overrides)
    if not cfg.tune:
        raise ConfigError(
            [
                "tune: missing; add a tune: section with space and n_trials (see README, "
                "Hyperparameter search)"
            ],
            str(path),
        )
    try:
        tune = TuneConfig.model_validate(cfg.tune)
    except ValidationError as exc:
        raise ConfigError(
            [
                f"tune.{'.'.join(str(p) for p in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors()
            ],
            str(path),
        ) from None
    base = _base_dict(cfg)
    problems: list[str] = []
    for key, dim in tune.space.items():
        values = dim.choices if dim.choices is not None else [_cast(dim, dim.low), _cast(dim, dim.high)]
        for value in values:
            try:
                validate_config(apply_overrides(base, [f"{key}={as_yaml(value)}"]))
            except ConfigError as exc:
                problems += [f"tune.space.{key} = {value!r}: {p}" for p in exc.problems]
    if problems:
        raise ConfigError(problems, str(path))
    return cfg, tune


def as_yaml(value: Any) -> str:
    """A value as `--set` text that YAML reads back as the same value (``1e-06`` would be a string)."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e")
    return text


def _cast(dim: SearchDim, v: float | None) -> Any:
    return int(v) if dim.integer and v is not None else v


def _base_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config every trial starts from: the tune config less its tune: section."""
    out = cfg.to_yaml_dict()
    out.pop("tune", None)
    return out


def resolve_metric(cfg: RunConfig, tune: TuneConfig) -> tuple[str, str]:
    """(metric, direction) of the study; defaults follow the run's metric_for_best."""
    from lorakit.tasks import get_task

    task = get_task(cfg.task)
    metric = tune.metric or cfg.train.metric_for_best or task.default_metric
    if tune.direction:
        return metric, tune.direction
    given = cfg.train.greater_is_better
    greater = given if given is not None else task.greater_is_better(metric)
    return metric, "maximize" if greater else "minimize"


# --------------------------------------------------------------------------------------------------
# Optuna: storage, study, sampling
# --------------------------------------------------------------------------------------------------


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LorakitError("lorakit tune needs Optuna: pip install 'lorakit[tune]'") from None
    return optuna


def make_storage(tune: TuneConfig, study_dir: Path) -> Any:
    """An RDB storage for a URL, else a journal file (default ``<study_dir>/study.journal``).

    A heartbeat lets a process notice trials whose process died (killed, machine lost): they are
    marked FAILED after two minutes without a beat instead of staying RUNNING forever.
    """
    optuna = _optuna()
    target = tune.storage or str(study_dir / JOURNAL)
    if "://" in target:
        return optuna.storages.RDBStorage(target, heartbeat_interval=30, grace_period=120)
    from optuna.storages.journal import JournalFileBackend

    Path(target).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(target))


def make_sampler(tune: TuneConfig, trial_number: int = 0) -> Any:
    """Optuna's TPE sampler, seeded with ``tune.seed + trial_number`` (unseeded when seed is null)."""
    return _optuna().samplers.TPESampler(seed=None if tune.seed is None else tune.seed + trial_number)


def make_pruner(tune: TuneConfig) -> Any:
    optuna = _optuna()
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_evals
        )
    if tune.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, tune.warmup_evals), reduction_factor=tune.reduction_factor
        )
    return optuna.pruners.NopPruner()


def suggest(trial: Any, key: str, dim: SearchDim) -> Any:
    """Sample one config value. List choices travel as their JSON text (Optuna stores plain values)."""
    if dim.choices is not None:
        labels = [
            c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c) for c in dim.choices
        ]
        picked = trial.suggest_categorical(key, labels)
        return dim.choices[labels.index(picked)]
    if dim.integer:
        return trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)


# --------------------------------------------------------------------------------------------------
# One trial: a `lorakit train` process, followed through its history.jsonl
# --------------------------------------------------------------------------------------------------


class TrialFailed(Exception):
    """The trial's process failed (crash, NaN loss, bad sampled value): the trial is FAILED, the study
    goes on.
    """


class _Follower:
    """Reads the complete lines a training process appends to its history.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        done = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(done)
        return [json.loads(line) for line in done.splitlines() if line.strip()]


def run_trial(
    trial: Any,
    *,
    tune: TuneConfig,
    metric: str,
    study_dir: Path,
    poll_seconds: float = 0.5,
    env: dict[str, str] | None = None,
) -> float:
    """Train one trial in its own process; report its validations to Optuna and stop it when pruned.

    Returns:
        The best validation value of ``metric`` (what metrics.json records as best_value).

    Raises:
        optuna.TrialPruned: The pruner stopped the trial (its process is killed).
        TrialFailed: The process exited with an error or the metric is missing / not finite.
    """
    optuna = _optuna()
    # A sampler seeded by the trial number: processes sharing the study propose different values
    # (one seed in every process would propose the same ones), and a study is reproducible.
    trial.study.sampler = make_sampler(tune, trial.number)
    params = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
    run_dir = study_dir / f"trial-{trial.number:03d}"
    log_path = study_dir / "logs" / f"trial-{trial.number:03d}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sets = [
        f"output.dir={run_dir}",
        f"train.metric_for_best={metric}",
        *(f"{k}={as_yaml(v)}" for k, v in params.items()),
    ]
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        str(study_dir / "base.yaml"),
        "--overwrite",
        "--no-progress",
    ]
    cmd += [arg for s in sets for arg in ("--set", s)]
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
    follower = _Follower(run_dir / "history.jsonl")
    evals = 0  # Optuna's step: the trial's n-th validation (comparable across trials of any batch size)
    with log_path.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        try:
            while True:
                done = proc.poll() is not None
                for row in follower.new_rows():
                    if row.get("split") != "validation" or not isinstance(row.get(metric), (int, float)):
                        continue
                    trial.report(float(row[metric]), evals)
                    evals += 1
                    if trial.should_prune():
                        log.info(
                            "trial %d: pruned at step %d (%s %.4f)",
                            trial.number,
                            row["step"],
                            metric,
                            row[metric],
                        )
                        raise optuna.TrialPruned(f"{metric} {row[metric]:.4f} at step {row['step']}")
                if done:
                    break
                time.sleep(poll_seconds)
        finally:
            if proc.poll() is None:  # pruned, interrupted or an error here: the trial's process goes too
                proc.kill()
                proc.wait()
                if env and env.get(PARENT_RUN_ENV):
                    from lorakit.training.tracking import end_child_runs

                    end_child_runs(env[PARENT_RUN_ENV], run_dir, "KILLED")
    return _trial_result(trial, proc.returncode, run_dir, log_path, metric)


def _die_with_parent() -> None:
    """In the trial's process, before exec: Linux kills it when `lorakit tune` dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _trial_result(trial: Any, returncode: int, run_dir: Path, log_path: Path, metric: str) -> float:
    if returncode in (130, -signal.SIGINT):  # Ctrl-C reached the trial first: the study is being interrupted
        raise KeyboardInterrupt
    if returncode != 0:
        lines = [
            ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
        ]
        reason = next(
            (ln for ln in reversed(lines) if ln.startswith("error:")),
            lines[-1] if lines else f"exit code {returncode}",
        )
        trial.set_user_attr("error", reason[:500])
        raise TrialFailed(f"trial {trial.number} failed: {reason} (log: {log_path})")
    final = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    value = final.get("best_value")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        trial.set_user_attr("error", f"{metric} = {value}")
        raise TrialFailed(f"trial {trial.number}: validation {metric} is {value}")
    test = (final.get("test") or {}).get(metric)
    if isinstance(test, (int, float)):
        trial.set_user_attr("test_value", float(test))
    trial.set_user_attr("train_seconds", final.get("train_seconds"))
    return float(value)


# --------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------


class _StopAtTrials:
    """Stops ``study.optimize`` once the study holds ``n`` trials that count (over every process).

    Counted: finished, pruned, failed by the trial itself, and running in another process (so two
    processes do not both start the last trial). Not counted: trials cut short by an interrupt.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, study: Any, trial: Any) -> None:
        if count_trials(study) >= self.n:
            study.stop()


def count_trials(study: Any) -> int:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return sum(
        1
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        or (t.state == TrialState.FAIL and "error" in t.user_attrs)
    )


def _fail_dead_trials(study: Any) -> None:
    """Trials left RUNNING by a process of this machine that is gone (killed) become FAILED.

    (RDB storages find them by their heartbeat too; the journal file has none.) They are marked
    interrupted and do not count toward ``n_trials``.
    """
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid)):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            log.info("trial %d: its process %s is gone; marked failed (interrupted)", t.number, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tune(
    config: str | Path, *, overrides: list[str] | None = None, poll_seconds: float = 0.5
) -> dict[str, Any]:
    """Run (or continue) the hyperparameter search a config's ``tune:`` section describes.

    Args:
        config: A run config YAML with a ``tune:`` section.
        overrides: ``section.key=value`` items applied first (e.g. ``tune.n_trials=8``).
        poll_seconds: How often a running trial's history is read.

    Returns:
        The summary written to ``<study>/study.json``: best trial, its params and test metric, trials.

    Raises:
        ConfigError: The config or its tune section is invalid.
        LorakitError: Optuna is missing, or no trial finished.
    """
    optuna = _optuna()
    cfg, tcfg = load_tune_config(config, overrides)
    metric, direction = resolve_metric(cfg, tcfg)
    study_dir = Path(cfg.output.dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    base = _base_dict(cfg)
    atomic.write_text_atomic(study_dir / "base.yaml", yaml.safe_dump(base, sort_keys=False))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=tcfg.study_name or study_dir.resolve().name,
        storage=make_storage(tcfg, study_dir),
        load_if_exists=True,
        direction=direction,
        sampler=make_sampler(tcfg),
        pruner=make_pruner(tcfg),
    )
    if study.user_attrs.get("metric", metric) != metric:
        raise LorakitError(
            f"tune.metric: the study in {study_dir} optimises {study.user_attrs['metric']}, not "
            f"{metric}; keep the metric or choose another output.dir"
        )
    study.set_user_attr("metric", metric)
    env = dict(os.environ)
    parent = _mlflow_parent(study, cfg) if "mlflow" in cfg.output.trackers else None
    if parent:
        env[PARENT_RUN_ENV] = parent
    _fail_dead_trials(study)
    done = count_trials(study)
    if tcfg.n_trials is None or done < tcfg.n_trials:
        log.info(
            "study %s: %d trial(s) so far; optimising %s (%s)", study.study_name, done, metric, direction
        )
        study.optimize(
            lambda trial: run_trial(
                trial, tune=tcfg, metric=metric, study_dir=study_dir, poll_seconds=poll_seconds, env=env
            ),
            timeout=tcfg.timeout_minutes * 60 if tcfg.timeout_minutes else None,
            catch=(TrialFailed,),
            callbacks=[_StopAtTrials(tcfg.n_trials)] if tcfg.n_trials else None,
        )
    from lorakit.experiments.study_report import write_study_outputs

    summary = write_study_outputs(study, tcfg, base, metric, direction, study_dir)
    if parent:
        _mlflow_parent_end(parent, summary)
    return summary


def _mlflow_parent(study: Any, cfg: RunConfig) -> str:
    """The study's parent MLflow run (made by the first process, kept in the study for the others)."""
    from lorakit.training.tracking import check_reachable, mlflow_client, mlflow_experiment

    if "mlflow_parent_run_id" in study.user_attrs:
        return study.user_attrs["mlflow_parent_run_id"]
    check_reachable(["mlflow"])
    client, uri = mlflow_client()
    run_id = client.create_run(
        mlflow_experiment(client, cfg.output.experiment, uri),
        run_name=f"tune: {study.study_name}",
        tags={"lorakit.study": study.study_name},
    ).info.run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def _mlflow_parent_end(run_id: str, summary: dict[str, Any]) -> None:
    from lorakit.training.tracking import flatten, mlflow_client

    client, _ = mlflow_client()
    best = summary.get("best") or {}
    for key, value in flatten({"best": best.get("params", {})}).items():
        client.set_tag(run_id, key, value)  # tags, not params: a continued study may find another best
    for key in ("value", "test_value"):
        if isinstance(best.get(key), (int, float)):
            client.log_metric(run_id, f"best_{key}", best[key])
    for name in ("report", "best.yaml", "trials.csv"):
        path = Path(summary["study_dir"]) / name
        if path.is_dir():
            client.log_artifacts(run_id, str(path), name)
        elif path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
