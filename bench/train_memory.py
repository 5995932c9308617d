r"""Resident memory of `lorakit train` over a run, for issue 8's memory target: settings side by side.

Each configuration is one `lorakit train` process on the benchmark's 2,000 IMDB training reviews
(packaged MiniLM, lorakit's defaults, ``--steps`` optimizer steps, one validation at the end, no test
split); its resident memory is sampled every 0.2 s from /proc. Printed per configuration: the peak,
the largest sample of each 10 s window (a creep shows as a rising row) and the seconds between the
logged steps 10 and ``--steps`` (the training steps' time, loading and scoring left out).

    .venv/bin/python bench/train_memory.py                                   # pad_to_multiple_of 32 vs none
    .venv/bin/python bench/train_memory.py --config "fp32=train.mixed_precision=no" \
        --config "fp32-none=train.mixed_precision=no,data.pad_to_multiple_of=null"
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 .venv/bin/python bench/train_memory.py \
        --config default=  # an environment lever
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULT_CONFIGS = ["pad32=", "no-pad-multiple=data.pad_to_multiple_of=null"]


def watch(cmd: list[str]) -> list[tuple[float, int]]:
    """Run ``cmd``; its resident memory (MB) every 0.2 s as (seconds, MB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0, samples = time.time(), []
    while proc.poll() is None:
        try:
            rss = next(
                int(line.split()[1]) // 1024
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if line.startswith("VmRSS")
            )
            samples.append((time.time() - t0, rss))
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return samples


def step_seconds(log: Path, first: int, last: int) -> float:
    """Seconds between the train.log lines of steps ``first`` and ``last``."""
    stamps = {}
    for line in log.read_text().splitlines():
        m = re.match(r"(\S+ \S+) INFO step (\d+)/", line)
        if m:
            stamps[int(m.group(2))] = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return (stamps[last] - stamps[first]).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config",
        action="append",
        metavar="NAME=key=value[,key=value]",
        help="a configuration: overrides on top of lorakit's defaults",
    )
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    lorakit = Path(sys.executable).with_name("lorakit")
    print(
        f"# bench/train_memory.py: lorakit train, packaged MiniLM, 2000 IMDB reviews, {args.steps} "
        "steps; resident memory every 0.2 s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="lorakit-memory-") as tmp:
        slices = common.write_slices(Path(tmp) / "data", 2000, 200, 0)
        config = common.lorakit_config(slices, Path(tmp))
        for name, overrides in common.variants(args.config or DEFAULT_CONFIGS):
            run = Path(tmp) / name.replace(":", "-")
            sets = [f"train.max_steps={args.steps}", "data.test=null", f"output.dir={run}", *overrides]
            samples = watch(
                [
                    str(lorakit),
                    "train",
                    str(config),
                    "--no-progress",
                    *(a for s in sets for a in ("--set", s)),
                ]
            )
            windows = [
                max((mb for t, mb in samples if w <= t < w + 10), default=0)
                for w in range(0, int(samples[-1][0]) + 1, 10)
            ]
            print(
                f"{name:28s} peak {max(mb for _, mb in samples):5d} MB  steps 10-{args.steps} "
                f"{step_seconds(run / 'train.log', 10, args.steps):6.1f} s  per 10 s: "
                f"{' '.join(str(w) for w in windows if w)}  {' '.join(overrides)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
