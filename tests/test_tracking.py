"""Trackers: what a run logs to MLflow (read back with MLflow's own client) and W&B (offline files)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

import lorakit
from conftest import run_cli
from lorakit.config.loading import load_config
from lorakit.errors import ConfigError
from lorakit.training.events import Callback
from lorakit.training.tracking import TrackerError, check_reachable

# Four evaluations (every 5 of 20 steps), a train row every 2 steps.
SETTINGS = {
    "train": {"max_steps": 20, "eval_every_steps": 5},
    "output": {"report_to": ["mlflow"], "experiment": "tiny"},
}


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_start(self, run_dir, config, info) -> None:
        self.calls.append("start")
        self.info = info

    def on_log(self, row) -> None:
        self.calls.append("log")

    def on_eval(self, row) -> None:
        self.calls.append("eval")

    def on_end(self, run_dir, final) -> None:
        self.calls.append("end")
        self.history_at_end = (Path(run_dir) / "history.jsonl").read_text()

    def close(self) -> None:
        self.calls.append("close")


def test_mlflow_gets_params_metric_history_and_artifacts(
    write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the local artifact store goes to ./mlartifacts
    rec = Recorder()
    result = lorakit.train(write_config(**SETTINGS), progress=False, callbacks=[rec])

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lora.r"] == "4" and run.data.params["train.learning_rate"] == "0.01"
    assert json.loads(run.data.params["output.report_to"]) == ["mlflow"]
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    train_rows = [r for r in result.history if r["split"] == "train"]
    assert [m.step for m in loss] == [r["step"] for r in train_rows]
    assert [m.value for m in loss] == pytest.approx([r["loss"] for r in train_rows])
    acc = client.get_metric_history(run.info.run_id, "validation/accuracy")
    assert [m.step for m in acc] == [5, 10, 15, 20]
    assert run.data.metrics["test/accuracy"] == pytest.approx(result.test["accuracy"])
    assert run.data.metrics["best_validation/accuracy"] == pytest.approx(result.validation["accuracy"])
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/lorakit.json"} <= files
    assert "report/index.html" in {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    # The extra callback heard every event in order, and history.jsonl grew while the run went on.
    assert rec.calls[0] == "start" and rec.calls[-2:] == ["end", "close"]
    assert rec.calls.count("eval") == 4 and rec.calls.count("log") == len(train_rows)
    assert rec.info["trainable_params"] == result.trainable_params
    assert rec.history_at_end.splitlines() == [json.dumps(r) for r in result.history]


def test_a_failed_run_is_marked_failed_in_mlflow(
    write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(lorakit.LorakitError, match="metric_for_best"):
        lorakit.train(
            write_config(
                output=SETTINGS["output"], train={"metric_for_best": "no_such_metric", "max_steps": 5}
            ),
            progress=False,
        )
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.slow  # W&B starts its service process (and git)
def test_wandb_offline_run_holds_config_metrics_and_artifacts(
    write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # no key: offline
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(logging.getLogger("lorakit"), "propagate", True)
    config = write_config(
        train={"max_steps": 4, "logging_steps": 2}, output={"report_to": ["wandb"], "report": False}
    )
    result = lorakit.train(config, progress=False)
    assert "logging stopped" not in caplog.text  # no call of the tracker failed
    (offline,) = (result.run_dir / "wandb").glob("offline-run-*")
    # W&B 0.31 keeps an offline run in one protobuf event log (what `wandb sync` uploads) and has no
    # Python reader for it: look for what was logged in its bytes.
    (log_file,) = offline.glob("run-*.wandb")
    wanted = (
        b"learning_rate",
        b"train/loss",
        b"validation/accuracy",
        b"test/accuracy",
        b"run-adapter",
        b"adapter_model.safetensors",
    )
    deadline = time.monotonic() + 60  # W&B's service process writes the log a moment after finish() returns
    while not all(w in log_file.read_bytes() for w in wanted) and time.monotonic() < deadline:
        time.sleep(0.5)
    raw = log_file.read_bytes()
    for logged in wanted:
        assert logged in raw, logged


def test_report_to_is_checked_at_load(write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(write_config(), ["output.report_to=[tensorboard, mlflow]"])
    assert cfg.output.trackers == ["tensorboard", "mlflow"]
    assert load_config(write_config(), ["output.report_to=none"]).output.trackers == []
    assert load_config(write_config(), ["output.tensorboard=true"]).output.trackers == [
        "tensorboard"
    ]  # report_to unset: as before
    with pytest.raises(ConfigError, match=r"output.report_to.0 = 'comet'"):
        load_config(write_config(), ["output.report_to=[comet]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"output.report_to: wandb is not installed; pip install 'lorakit\[track\]'"
    ):
        load_config(write_config(), ["output.report_to=[wandb]"])


def test_unreachable_trackers_are_one_line_errors_before_anything_is_written(
    write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(TrackerError, match="cannot be reached"):
        check_reachable(["mlflow"], timeout=2)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(TrackerError, match="WANDB_MODE=offline"):
        check_reachable(["wandb"], timeout=2)
    # The CLI: exit 2, one line, no run folder.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    r = run_cli(capsys, "train", str(write_config(output={"report_to": ["mlflow"]})), "--no-progress")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith(
        "error: output.report_to: mlflow: the tracking server http://127.0.0.1:9"
    )
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_fails_mid_run_warns_once_and_training_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from lorakit.training import tracking

    class Down:
        calls = 0

        def log_batch(self, *args, **kwargs) -> None:
            Down.calls += 1
            raise ConnectionError("connection refused")

    monkeypatch.setattr(tracking, "mlflow_client", lambda: (Down(), "http://tracker"))
    monkeypatch.setattr(tracking.log, "propagate", True)  # the CLI turns it off; caplog listens at the root
    tracker = tracking.MLflowTracker(experiment="x", run_name="r")
    tracker.run_id = "abc"
    tracker.on_log({"step": 1, "loss": 0.5, "lr": 1e-3})  # does not raise
    tracker.on_eval({"step": 1, "split": "validation", "accuracy": 0.5})
    assert Down.calls == 1 and tracker.broken
    assert "mlflow: logging stopped after an error (connection refused); training goes on" in caplog.text
