"""Reliability, second round (issue 25): what a new user still trips over.

Cases that do not fit the one-line-error catalogue of ``test_bad_inputs.py`` (a warning, a lock, a
full disk, a shutdown): each test names its case.
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorakit
from conftest import free_port, make_config, make_texts, write_csv
from lorakit.adapters.folder import read_metadata
from lorakit.cli import main

# ---- 1. labels that differ only by surrounding whitespace or by case ----------------------------


def _whitespace_labels(n: int) -> list[tuple[str, str]]:
    variants = {"pos": ["positive", " positive"], "neg": ["negative ", "negative"]}
    return [(t, variants[lab][i % 4 // 2]) for i, (t, lab) in enumerate(make_texts(n))]


def test_labels_with_surrounding_whitespace_are_stripped_and_check_says_so(
    tmp_path, tiny_bert_dir, capsys
) -> None:
    data = write_csv(tmp_path / "ws.csv", _whitespace_labels(120))
    config = make_config(tmp_path, tiny_bert_dir, data)
    main_exit(["check", str(config)])
    out = capsys.readouterr().out
    assert "labels    2: negative, positive" in out, out
    assert "surrounding whitespace" in out and "stripped" in out, out


def test_labels_with_surrounding_whitespace_train_two_classes_and_the_log_says_so(
    tmp_path, tiny_bert_dir
) -> None:
    data = write_csv(tmp_path / "ws.csv", _whitespace_labels(120))
    result = lorakit.train(make_config(tmp_path, tiny_bert_dir, data, train={"max_steps": 1}), progress=False)
    meta = read_metadata(result.adapter_dir)
    assert meta["label_space"]["id2label"] == {"0": "negative", "1": "positive"}
    assert "surrounding whitespace" in (result.run_dir / "train.log").read_text()


def test_labels_differing_only_by_case_are_kept_with_a_warning(tmp_path, tiny_bert_dir, capsys) -> None:
    rows = [
        (t, {"pos": ["Positive", "positive"][i % 4 // 2], "neg": "negative"}[lab])
        for i, (t, lab) in enumerate(make_texts(120))
    ]
    config = make_config(tmp_path, tiny_bert_dir, write_csv(tmp_path / "case.csv", rows))
    main_exit(["check", str(config)])
    out = capsys.readouterr().out
    assert "labels    3:" in out, out
    assert "differ only by case" in out and "'Positive'" in out and "'positive'" in out, out


def main_exit(args: list[str]) -> None:
    """Run the CLI in-process; a normal end (no SystemExit or exit code 0) is required."""
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, f"exit code {exc.code}"


# ---- 6. two `lorakit train` runs into the same folder at once ------------------------------------


def _one_error_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI in-process; it must end with exit code 2 and one `error:` line (the last; a run that
    had started training logged its progress before), which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err and sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


@pytest.mark.slow  # a second `lorakit train` process
def test_a_second_train_into_a_folder_in_use_is_refused_and_a_killed_run_frees_it(
    tmp_path, tiny_bert_dir, capsys
) -> None:
    from lorakit.training.rundir import RunLock

    config = make_config(
        tmp_path, tiny_bert_dir, write_csv(tmp_path / "r.csv", make_texts(160)), train={"epochs": 500}
    )
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(config), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run / "train.log").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.1)
        line = _one_error_line(["train", str(config), "--overwrite"], capsys)
        assert "is in use by another lorakit train" in line, line
        assert first.poll() is None  # the first run goes on, its folder untouched
        assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    finally:
        first.kill()  # SIGKILL: no clean-up runs, as in a crash
        first.wait(timeout=60)
    lock = RunLock(run)
    lock.acquire()  # the kernel let go of the killed run's lock
    lock.release()


# ---- 7. a full disk while an artifact is written -------------------------------------------------


def _no_space(name: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", name)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(folder: Path) -> list[str]:
    return [
        p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".incoming-" in p.name or ".old-" in p.name
    ]


def test_disk_full_at_a_checkpoint_keeps_the_previous_one_and_the_run_resumes(
    tmp_path, tiny_bert_dir, monkeypatch, capsys
) -> None:
    import torch

    from lorakit.training import checkpoint

    config = make_config(
        tmp_path, tiny_bert_dir, write_csv(tmp_path / "r.csv", make_texts(160)), train={"epochs": 3}
    )
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) >= 2:  # the first checkpoint is written, the second finds the disk full
            raise _no_space(str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = _one_error_line(["train", str(config), "--no-progress"], capsys)
    assert "no space left on the device while writing a checkpoint" in line and "--resume" in line, line
    kept = checkpoint.complete(run)
    assert len(kept) == 1 and checkpoint.load_latest(run)["epoch"] == 1
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists() and not _leftovers(run)
    monkeypatch.undo()
    result = lorakit.train(config, resume=True, progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_disk_full_at_the_adapter_keeps_the_checkpoint_and_the_run_resumes(
    tmp_path, tiny_bert_dir, monkeypatch, capsys
) -> None:
    import peft.peft_model

    config = make_config(
        tmp_path, tiny_bert_dir, write_csv(tmp_path / "r.csv", make_texts(160)), train={"epochs": 1}
    )
    run = tmp_path / "run"
    monkeypatch.setattr(
        peft.peft_model,
        "safe_save_file",
        lambda *a, **k: (_ for _ in ()).throw(_no_space("adapter_model.safetensors")),
    )
    line = _one_error_line(["train", str(config), "--no-progress"], capsys)
    assert "no space left on the device while writing the adapter" in line, line
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists() and not _leftovers(tmp_path)
    assert (run / "checkpoints").is_dir()
    monkeypatch.undo()
    result = lorakit.train(config, resume=True, progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file() and (
        result.run_dir / "metrics.json"
    ).is_file()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    return lorakit.train(
        make_config(folder, tiny_bert_dir, write_csv(folder / "r.csv", make_texts(160)), train={"epochs": 1}),
        progress=False,
    ).run_dir


def test_disk_full_during_an_export_leaves_the_previous_export_intact(
    tmp_path, finished, monkeypatch, capsys
) -> None:
    import transformers.modeling_utils

    out = tmp_path / "merged"
    main_exit(["export", str(finished), "--merge", str(out)])
    before = _hashes(out)
    monkeypatch.setattr(
        transformers.modeling_utils,
        "safe_save_file",
        lambda *a, **k: (_ for _ in ()).throw(_no_space("model.safetensors")),
    )
    line = _one_error_line(["export", str(finished), "--merge", str(out), "--overwrite"], capsys)
    assert "no space left on the device while writing the merged model" in line, line
    assert _hashes(out) == before and not _leftovers(tmp_path)


def test_disk_full_while_publishing_keeps_the_index_and_earlier_versions(
    tmp_path, finished, monkeypatch, capsys
) -> None:
    import shutil

    from lorakit.adapters import registry as registry_module
    from lorakit.adapters.registry import Registry

    reg = tmp_path / "reg"
    main_exit(["publish", str(finished), "--name", "demo", "--registry", str(reg)])
    changed = tmp_path / "changed"
    shutil.copytree(finished / "adapter", changed)
    (changed / "README.md").write_text("a new card\n")
    index_before = (reg / "index.sqlite").read_bytes()
    real_copytree = shutil.copytree

    def copytree_then_full(src, dst, **kwargs):
        real_copytree(src, dst, **kwargs)  # the copy half-succeeds, then the disk is full
        raise _no_space(str(dst))

    monkeypatch.setattr(registry_module.shutil, "copytree", copytree_then_full)
    line = _one_error_line(["publish", str(changed), "--name", "demo", "--registry", str(reg)], capsys)
    assert "no space left on the device while publishing" in line and "earlier versions are intact" in line, (
        line
    )
    monkeypatch.undo()
    assert (reg / "index.sqlite").read_bytes() == index_before
    versions = Registry(reg).list("demo")
    assert [v.version for v in versions] == [1] and Registry(reg).verify("demo:1")
    assert not _leftovers(reg) and not (reg / "adapters" / "demo" / "v2").exists()


# ---- 8. SIGTERM to `lorakit serve` ---------------------------------------------------------------


def _post(url: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError as e:  # connection refused / reset: the request was dropped
        return 0, {"error": str(e)}


@pytest.mark.slow  # a `lorakit serve` process
def test_sigterm_to_serve_finishes_the_requests_in_flight_then_exits(finished) -> None:
    import json
    import signal
    import threading
    import urllib.request

    port = free_port()
    # A long batching window keeps the requests waiting inside the server when the signal comes.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            f"a={finished}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--window-ms",
            "1500",
            "--device",
            "cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start: " + (
                proc.stderr.read() if proc.poll() is not None else "timeout"
            )
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                time.sleep(0.2)
        results: list[tuple[int, dict]] = []
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(
                    _post(base + "/v1/predict", {"adapter": "a", "inputs": [f"the film was great {i}"]})
                )
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all eight are inside the server, waiting for their batch
        assert not results, "the requests finished before the signal: the test proves nothing"
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=90)
        exit_code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert len(results) == 8 and all(
        code == 200 and len(body["predictions"]) == 1 for code, body in results
    ), results
    assert exit_code == 0, proc.stderr.read()  # a clean stop, as supervisors expect


# ---- 10. noise a user should not see ------------------------------------------------------------


def test_check_names_a_few_of_many_fully_trained_modules_not_all(tmp_path, tiny_bert_dir) -> None:
    from lorakit.config.loading import load_config
    from lorakit.training.preflight import Plan

    norms = [f"_blocks.{i}._bn{j}" for i in range(16) for j in range(3)] + [
        "_bn1"
    ]  # 49, as EfficientNet-Lite0 has
    cfg = load_config(make_config(tmp_path, tiny_bert_dir, tmp_path / "data.csv"))
    plan = Plan(
        config=cfg,
        model_path="m",
        model_type="efficientnet",
        sizes={"train": 1},
        columns=[],
        label_counts={},
        labels=[],
        target_modules=["_project_conv"],
        modules_to_save=norms,
        trainable=1,
        total=2,
        device="cpu",
        precision="fp32",
        steps=1,
    )
    line = next(x for x in plan.lines() if x.lstrip().startswith("trained"))
    assert "49 modules: _blocks.0._bn0, _blocks.0._bn1, _blocks.0._bn2, _blocks.1._bn0, …" in line, line
    assert line.count("_bn") == 4, line


def test_no_sequence_length_warning_when_lorakit_truncates_on_purpose(tmp_path, tiny_bert_dir) -> None:
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "short-bert"
    shutil.copytree(tiny_bert_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.model_max_length = 16  # as real models declare theirs (512 for MiniLM)
    tok.save_pretrained(model)
    long_rows = [(" ".join([text] * 4), label) for text, label in make_texts(80)]  # 20 to 56 words each
    config = make_config(
        tmp_path,
        model,
        write_csv(tmp_path / "long.csv", long_rows),
        data={"max_length": 16, "validation_size": 16, "test_size": 0},
        train={"max_steps": 1},
    )
    import logging

    import datasets

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    datasets.disable_caching()  # a cached tokenization from an earlier run would hide the warning
    try:
        lorakit.train(config, progress=False)
    finally:
        datasets.enable_caching()
        hf_logger.removeHandler(handler)
    assert not [m for m in seen if "Token indices sequence length is longer" in m], seen


def test_python_api_predict_shows_no_gradient_checkpointing_future_warning(finished) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.predict(finished, ["the film was great"])
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], [
        str(w.message) for w in caught
    ]
