"""`lorakit tune`: trials as `lorakit train` processes, pruning, failures, restart, two processes, MLflow.

Which trial does what is fixed by enqueueing its params (Optuna's enqueue_trial) before the study
runs; on the tiny model, learning rate 0.5 takes the validation loss to 0.9 at the first evaluation
while 1e-6 leaves it at 0.693 (no warm-up), so the median pruner stops the first one for certain.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.experiments.tuning import JOURNAL, load_tune_config

QV = ["query", "value"]
TUNE = {
    "space": {
        "train.learning_rate": {"low": 1e-6, "high": 0.5, "log": True},
        "train.max_steps": {"choices": [10, 400]},
        "lora.target_modules": {"choices": [QV, ["no_such_module"]]},
    },
    "metric": "loss",
    "n_trials": 3,
    "startup_trials": 1,
    "warmup_evals": 0,
}
TRAIN = {"max_steps": 10, "eval_every_steps": 5, "logging_steps": 5, "warmup_ratio": 0}


def _config(write_config, tmp_path: Path, **tune) -> Path:
    path = write_config(train=TRAIN, output={"dir": str(tmp_path / "study"), "report": False})
    cfg = yaml.safe_load(path.read_text())
    cfg["tune"] = TUNE | tune
    path.write_text(yaml.safe_dump(cfg))
    return path


def _study(tmp_path: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    (tmp_path / "study").mkdir(exist_ok=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "study" / JOURNAL)))
    return optuna.create_study(study_name="study", storage=storage, load_if_exists=True, direction="minimize")


def _enqueue(study: optuna.Study, lr: float, steps: int = 10, modules: list[str] = QV) -> None:
    study.enqueue_trial(
        {"train.learning_rate": lr, "train.max_steps": steps, "lora.target_modules": json.dumps(modules)}
    )


def _tune(config: Path, *sets: str, **kw) -> subprocess.Popen:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "tune", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def test_tune_section_problems_are_reported_at_load_all_at_once(write_config, tmp_path: Path) -> None:
    bad = TUNE | {
        "space": {
            "lora.rr": {"choices": [4]},
            "lora.r": {"choices": [8, 0]},
            "train.learning_rate": {"low": 1e-3},
        }
    }
    with pytest.raises(ConfigError) as exc:
        load_tune_config(_config(write_config, tmp_path, **bad))
    text = str(exc.value)
    assert "tune.space.train.learning_rate: give either low and high (a range) or choices" in text
    with pytest.raises(ConfigError) as exc:
        load_tune_config(
            _config(
                write_config, tmp_path, space={"lora.rr": {"choices": [4]}, "lora.r": {"choices": [8, 0]}}
            )
        )
    text = str(exc.value)
    assert "2 problems" in text and "tune.space.lora.rr = 4: lora.rr: unknown key; did you mean 'r'?" in text
    assert "tune.space.lora.r = 0: lora.r = 0: input should be greater than or equal to 1" in text
    with pytest.raises(ConfigError, match="give n_trials and/or timeout_minutes"):
        load_tune_config(_config(write_config, tmp_path, n_trials=None))
    cfg = write_config()
    with pytest.raises(ConfigError, match="tune: missing"):
        load_tune_config(cfg)


@pytest.mark.slow  # a `lorakit tune` and three trial processes
def test_study_prunes_fails_and_logs_to_mlflow(write_config, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    config = _config(write_config, tmp_path)
    study = _study(tmp_path)
    _enqueue(study, 1e-6)  # 0: completes
    _enqueue(study, 1e-6, modules=["no_such_module"])  # 1: its process fails (no such target module)
    _enqueue(study, 0.5, steps=400)  # 2: pruned at its first evaluation, its process killed
    out = _finish(_tune(config, "output.report_to=[mlflow]", env=env, cwd=tmp_path))

    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "PRUNED"]
    assert "no_such_module" in trials[1].user_attrs["error"]
    assert (
        list(trials[2].intermediate_values) == [0] and trials[2].intermediate_values[0] > 0.8
    )  # 0.69 for trial 0
    assert not (tmp_path / "study" / "trial-002" / "metrics.json").exists()  # killed at step 5 of 400
    summary = json.loads((tmp_path / "study" / "study.json").read_text())
    metrics = json.loads((tmp_path / "study" / "trial-000" / "metrics.json").read_text())
    assert summary["best"]["number"] == 0 and summary["best"]["value"] == pytest.approx(metrics["best_value"])
    assert summary["best"]["test_value"] == pytest.approx(metrics["test"]["loss"])
    assert "best: trial 0, validation loss" in out and "held-out test" in out
    best = yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())
    assert (
        best["train"]["learning_rate"] == 1e-6 and best["lora"]["target_modules"] == QV and "tune" not in best
    )
    page = (tmp_path / "study" / "report" / "index.html").read_text()
    assert page.count("Plotly.newPlot") >= 3  # history, importances, parallel coordinates, ...
    assert (
        re.search(r"<script[^>]*\bsrc=", page) is None and len(page) > 1_000_000
    )  # plotly.js embedded, no CDN

    # MLflow: one parent run, a child per trial that started training; the pruned one marked KILLED.
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"trial-000", "trial-002"}
    assert children["trial-000"].info.status == "FINISHED" and children["trial-002"].info.status == "KILLED"
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_value"] == pytest.approx(
        metrics["best_value"]
    )


@pytest.mark.slow  # two `lorakit tune` and two trial processes
def test_a_killed_study_continues_where_it_stopped(write_config, tmp_path: Path) -> None:
    # Killed in the middle of a trial (SIGKILL, nothing cleaned up), then started again: the dead
    # trial is marked failed and not counted, its training process died with it, the study goes on.
    config = _config(write_config, tmp_path, n_trials=1, pruner="none")
    study = _study(tmp_path)
    _enqueue(study, 1e-6, steps=400)  # 0: killed mid-way
    _enqueue(study, 1e-6)  # 1: the restart's trial
    proc = _tune(config)
    history = tmp_path / "study" / "trial-000" / "history.jsonl"
    deadline = time.monotonic() + 300
    while not (history.is_file() and history.read_text().count("validation")) and time.monotonic() < deadline:
        time.sleep(0.2)
    trainer = [p for p in psutil.Process(proc.pid).children() if "trial-000" in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert trainer and psutil.wait_procs(trainer, timeout=30)[1] == []  # the trial's process went with it
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "WAITING"]
    _finish(_tune(config))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # n_trials=1: the killed one does not count
    assert trials[0].user_attrs["interrupted"] is True and "error" not in trials[0].user_attrs


@pytest.mark.slow  # two `lorakit tune` processes and three trial processes
def test_two_processes_share_one_study_without_running_a_trial_twice(write_config, tmp_path: Path) -> None:
    config = _config(
        write_config,
        tmp_path,
        n_trials=3,
        space={"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
        pruner="none",
    )
    _study(tmp_path)  # the journal exists before both start
    procs = [_tune(config), _tune(config)]  # the second starts a trial while the first runs one
    for p in procs:
        _finish(p)
    trials = _study(tmp_path).get_trials()
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both processes ran trials
    for t in trials:  # each trial's run folder was trained with that trial's params, once
        saved = yaml.safe_load((tmp_path / "study" / f"trial-{t.number:03d}" / "config.yaml").read_text())
        assert saved["train"]["learning_rate"] == pytest.approx(t.params["train.learning_rate"])
        log = (tmp_path / "study" / "logs" / f"trial-{t.number:03d}.log").read_text()
        assert log.count("best validation loss") == 1
    assert len({t.params["train.learning_rate"] for t in trials}) == 3


def test_the_shipped_tune_config_loads() -> None:
    cfg, tune = load_tune_config(Path(__file__).resolve().parents[1] / "configs" / "imdb-minilm-tune.yaml")
    assert tune.n_trials == 16 and tune.space["lora.target_modules"].choices[2] == "all-linear"
    assert cfg.train.eval_every_steps == 25
