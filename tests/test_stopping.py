"""A clean stop: the first SIGTERM / SIGINT is remembered for the training loop, a second one stops
at once.
"""

from __future__ import annotations

import signal

import pytest

from lorakit.runtime.stopping import StopRequest, TrainingStopped


def test_first_signal_is_a_request_second_stops_at_once() -> None:
    # Python's own SIGINT handler, as in a terminal (a pytest-xdist worker may have replaced it)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    try:
        _first_requests_second_stops(before)
    finally:
        signal.signal(signal.SIGINT, outer)


def _first_requests_second_stops(before: object) -> None:
    with StopRequest() as stop:
        assert stop.requested is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the default SIGINT handler is back: KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is before
    assert TrainingStopped.exit_code == 130


def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(
    write_config, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM after a few steps: a checkpoint, exit code 130, and --resume ends where a whole run does."""
    import torch
    from safetensors.torch import load_file

    import lorakit.training as training
    from lorakit.cli import main

    whole = write_config(output={"dir": str(tmp_path / "whole"), "tensorboard": False, "report": False})
    training.train(whole, progress=False)
    stopped = write_config(output={"dir": str(tmp_path / "stopped"), "tensorboard": False, "report": False})

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_signal(self, *args, **kwargs):  # SIGTERM arrives during the 5th optimizer step
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    with pytest.raises(SystemExit) as exc:
        main(["train", str(stopped), "--no-progress"])
    assert exc.value.code == 130
    assert list((tmp_path / "stopped" / "checkpoints").glob("step-00000005"))
    assert not (tmp_path / "stopped" / "adapter").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    training.train(tmp_path / "stopped" / "config.yaml", resume=True, progress=False)
    expected = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=0), k
