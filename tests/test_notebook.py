"""examples/walkthrough.ipynb runs: every cell, in a kernel of its own, on a tiny random BERT and data
made here (its parameters cell is replaced), so the notebook cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_texts, write_csv

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"


@pytest.mark.slow  # a Jupyter kernel is a process of its own
def test_walkthrough_notebook_runs_every_stage(tmp_path, tiny_bert_dir):
    nbformat = pytest.importorskip("nbformat", reason="the docs extra (make setup installs it)")
    nbclient = pytest.importorskip("nbclient", reason="the docs extra (make setup installs it)")
    pytest.importorskip("fastapi")
    data = write_csv(tmp_path / "reviews.csv", make_texts(96))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data: {{train: {data}, validation_size: 16, test_size: 16, max_length: 32}}\n"
        f"model: {{name_or_path: {tiny_bert_dir}}}\n"
        "lora: {r: 4, alpha: 8}\n"
        "train: {epochs: 1, batch_size: 16, learning_rate: 1.0e-2}\n"
        "output: {tensorboard: false}\n"
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert "CONFIG =" in nb.cells[params].source  # the cell the notebook says holds the knobs
    nb.cells[params].source = f'CONFIG = "{config}"\nWORK = "{tmp_path / "work"}"\nOVERRIDES = []'
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    work = tmp_path / "work"
    assert (work / "run" / "adapter" / "adapter_model.safetensors").is_file()  # trained
    assert (work / "eval" / "metrics.json").is_file()  # evaluated
    assert (work / "merged" / "config.json").is_file()  # exported, checked
    assert "walkthrough:1" in text  # published
    assert "200 " in text and '"label"' in text  # served: /v1/predict answered with labels
