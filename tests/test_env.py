"""`lorakit env`: what a bug report needs, as text and as JSON."""

from __future__ import annotations

import json
import os
from importlib import metadata

import torch

from conftest import run_cli


def test_env_json_names_versions_hardware_precision_and_folders(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    r = run_cli(capsys, "env", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for lib in ("torch", "transformers", "peft", "datasets"):
        assert report["libraries"][lib] == metadata.version(lib)
    assert report["python"].startswith(("CPython", "PyPy"))
    cpu = report["cpu"]
    assert cpu["cores"] == os.cpu_count() and cpu["native_bf16"] == (cpu["avx512_bf16"] or cpu["amx"])
    # what `train.mixed_precision: auto` picks, from the same facts the report gives
    if torch.cuda.is_available():
        assert report["device"] == "cuda" and report["gpus"]
    else:
        assert report["gpus"] == []
        assert report["mixed_precision_auto"] == ("bf16 autocast" if cpu["native_bf16"] else "fp32")
    assert report["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert set(report["extras"]) >= {"serve", "ui", "tune", "track", "onnx"}
    assert report["extras"]["serve"] == "installed"  # fastapi and uvicorn: the tests of serve need them
    assert report["folders"]["registry"] == f"{tmp_path / 'reg'} (none yet)"
    assert report["folders"]["cache"] == str(tmp_path / "cache")


def test_env_text_is_one_line_per_fact(capsys):
    r = run_cli(capsys, "env")
    assert r.returncode == 0, r.stderr
    keys = [line.split()[0] for line in r.stdout.splitlines()]
    for key in ("lorakit", "libraries.torch", "cpu.native_bf16", "mixed_precision_auto", "folders.registry"):
        assert key in keys, key
    assert len(keys) == len(set(keys))
