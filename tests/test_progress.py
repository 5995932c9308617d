"""`lorakit.train(progress=False)` is as quiet as the CLI's `--no-progress`: no bar of lorakit's, of
datasets' or of transformers', and the libraries' own switches are put back afterwards."""

from __future__ import annotations

import re

import datasets
import huggingface_hub.utils as hub
import pytest
from transformers.utils import logging as hf_logging

import lorakit

# what every tqdm bar prints (a percentage frame, or a rate when the total is unknown); no log line does
BAR = re.compile(r"\d+%\||\[\d\d:\d\d, .*/s\]")


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_hides_every_bar(write_config, capsys, progress):
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()
    hub.enable_progress_bars()
    cfg = write_config(train={"epochs": 1}, data={"max_train_samples": 48})
    lorakit.train(cfg, progress=progress)
    err = capsys.readouterr().err
    bars = [line for line in err.replace("\r", "\n").splitlines() if BAR.search(line)]
    if progress:
        for what in ("Generating train split", "tokenize data.train", "Loading weights", "train: "):
            assert any(what in line for line in bars), (what, err[-2000:])  # datasets, transformers, lorakit
    else:
        assert not bars, bars[:5]
    # whatever the run did, the caller's settings are as they were
    assert datasets.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    assert not hub.are_progress_bars_disabled()
