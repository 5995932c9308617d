"""Soak test: steady mixed traffic against a local `lorakit serve` for 10 minutes; does memory creep?

The server holds 8 adapters of the packaged MiniLM (one real lorakit adapter, cloned with perturbed
weights: see bench/serve.py). A fixed-rate client (loopback only) sends a steady mix:

    70%  /v1/predict, 1 to 8 IMDB reviews (first 400 characters), a random adapter, top_k 1 to 3
    10%  /v1/predict naming two adapters in quick succession (mixed-adapter batches)
    10%  bad requests: an unknown adapter (404), a malformed body (422), an empty input list (422)
    10%  /healthz and /metrics

The server's resident memory (VmRSS) is sampled every 5 s. The figure is RSS at the end against RSS
after the first minute (warm-up: first batches, allocator pools); the issue's bar is within 10%.

    .venv/bin/python bench/soak.py                 # 10 minutes, ~3 min of set-up on 2 CPU cores
    .venv/bin/python bench/soak.py --minutes 2     # a shorter smoke run
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import clone_adapters, lorakit_server, reviews, train_source


def request(port: int, method: str, path: str, body: bytes | None = None) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request(
            method, path, body=body, headers={"content-type": "application/json"} if body is not None else {}
        )
        r = c.getresponse()
        r.read()
        return r.status
    except OSError:
        return 0  # refused / reset: counted as a failure
    finally:
        c.close()


def one_request(port: int, names: list[str], texts: list[str], rng: random.Random) -> tuple[str, int]:
    """Send one request of the mix; (kind, HTTP status; 0 when no answer came within 60 s or the
    connection failed).
    """
    roll = rng.random()
    if roll < 0.7:
        body = {
            "adapter": rng.choice(names),
            "inputs": rng.sample(texts, rng.randint(1, 8)),
            "top_k": rng.randint(1, 3),
        }
        return "predict", request(port, "POST", "/v1/predict", json.dumps(body).encode())
    if roll < 0.8:
        a, b = rng.sample(names, 2)
        s1 = request(
            port, "POST", "/v1/predict", json.dumps({"adapter": a, "inputs": [rng.choice(texts)]}).encode()
        )
        s2 = request(
            port, "POST", "/v1/predict", json.dumps({"adapter": b, "inputs": [rng.choice(texts)]}).encode()
        )
        return "predict", s1 if s1 != 200 else s2
    if roll < 0.9:
        bad = rng.choice(
            [
                json.dumps({"adapter": "nobody", "inputs": ["x"]}).encode(),
                b'{"adapter": ',
                json.dumps({"adapter": names[0], "inputs": []}).encode(),
            ]
        )
        return "bad", request(port, "POST", "/v1/predict", bad)
    return "probe", request(port, "GET", rng.choice(["/healthz", "/metrics"]))


def traffic(
    port: int,
    names: list[str],
    texts: list[str],
    *,
    seconds: float,
    rate: float,
    clients: int,
    server,
    samples: list,
) -> dict:
    """``clients`` threads, each sending at ``rate / clients`` requests per second, for ``seconds``."""
    counts: dict[str, dict[int, int]] = {}
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        next_at = start + rng.random() / (rate / clients)
        while next_at < stop:
            time.sleep(max(0.0, next_at - time.monotonic()))
            kind, status = one_request(port, names, texts, rng)
            with lock:
                counts.setdefault(kind, {}).setdefault(status, 0)
                counts[kind][status] += 1
            next_at += 1 / (rate / clients)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while time.monotonic() < stop:
        samples.append((round(time.monotonic() - start, 1), round(server.rss_mb(), 1)))
        time.sleep(5)
    for t in threads:
        t.join(timeout=120)
    samples.append((round(time.monotonic() - start, 1), round(server.rss_mb(), 1)))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second, all clients together")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorakit-soak-") as tmp:
        work = Path(tmp)
        adapters = clone_adapters(train_source(work), work / "adapters", args.adapters)
        names = [f"a{i:03d}" for i in range(len(adapters))]
        texts = reviews(200)
        server = lorakit_server(adapters, work / "server.log")
        samples: list[tuple[float, float]] = []
        try:
            counts = traffic(
                server.port,
                names,
                texts,
                seconds=args.minutes * 60,
                rate=args.rate,
                clients=args.clients,
                server=server,
                samples=samples,
            )
        finally:
            server.stop()
    after_1 = (
        next(rss for t, rss in samples if t >= 60) if any(t >= 60 for t, _ in samples) else samples[-1][1]
    )
    end = [rss for t, rss in samples if t <= args.minutes * 60][
        -1
    ]  # the last sample inside the traffic window
    drained = samples[-1][1]  # once the clients' last requests came back
    served = sum(counts.get("predict", {}).values())
    failed = sum(n for s, n in counts.get("predict", {}).items() if s != 200)
    result = {
        "minutes": args.minutes,
        "rate": args.rate,
        "adapters": len(adapters),
        "counts": {k: {str(s): n for s, n in v.items()} for k, v in counts.items()},
        "rss_mb_after_1_min": after_1,
        "rss_mb_end": end,
        "rss_change_pct": round(100 * (end - after_1) / after_1, 2),
        "rss_mb_drained": drained,
        "rss_mb_max": max(r for _, r in samples),
        "samples": samples,
    }
    print(
        f"soak: {args.minutes:g} min at {args.rate:g} req/s over {len(adapters)} adapters; predict "
        f"requests {served:,}, failed {failed}"
    )
    print(f"  responses by kind and status: {result['counts']}")
    print(
        f"  server RSS after minute 1: {after_1:.1f} MB; at the end of the traffic: {end:.1f} MB "
        f"({result['rss_change_pct']:+.2f}%); "
        f"once the last requests came back: {drained:.1f} MB"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
