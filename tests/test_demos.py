"""The demo scripts still run end to end (slow: run by `make test` and CI): `make demo-dpo`'s script in
its --quick mode (a handful of prompts and steps on the packaged SmolLM2 and MiniLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_the_dpo_demo_runs_end_to_end(tmp_path: Path, smollm2_cache: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dpo_demo.py"), "--quick", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, LORAKIT_CACHE=str(smollm2_cache)),  # SmolLM2 converted once (conftest)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Warning" not in r.stdout + r.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["pairs"] > 0 and result["heldout_prompts"] == 8
    for mode in ("greedy", "sampled"):
        for when in ("before", "after"):
            assert 0.0 <= result[mode][when]["positive_share"] <= 1.0
    meta = json.loads((tmp_path / "dpo" / "adapter" / "lorakit.json").read_text())
    assert meta["task"] == "preference"
