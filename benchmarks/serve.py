"""Load test of ``rnnmath serve`` on this machine (loopback only), beside one ``rnnmath predict`` per request.

For each server setting (dynamic batching on: ``--max-batch 64 --max-delay-ms 5``; off: ``--max-batch 1``) a
server is started on a free loopback port, warmed up, and driven by C concurrent clients (default 1, 8, 64),
each a keep-alive HTTP/1.1 connection that sends its next request as soon as the last is answered (a closed
loop), every request one sentence. Each run stops after ``--requests`` answers or ``--seconds`` seconds,
whichever comes first. Reported: answers per second, p50 and p99 latency (send to last byte), forward passes
per request (from GET /info). Then ``--predict-calls`` sequential ``rnnmath predict DIR TEXT`` processes, one
per request: their wall time each is that baseline's latency, and its inverse its throughput.

    rnnmath demo --out runs/demo                                   # a default-preset model (~30 s)
    python benchmarks/serve.py --model runs/demo [--json]

The clients run in this process (asyncio), on the same cores as the server: on a small machine they take
CPU from it, so the figures are a lower bound of what the server does with the machine to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rnnmath.common import cpu_model


def start_server(model: str, flags: list[str], threads: int) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "rnnmath", "serve", model, "--port", "0", "--threads",
                                str(threads), *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:
        if "serving" in line:
            return process, int(line.split("http://127.0.0.1:")[1].split()[0])
    raise RuntimeError("the server did not start")


async def http_request(reader, writer, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    method = "POST" if body is not None else "GET"
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + (body or b""))
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return int(status_line.split()[1]), await reader.readexactly(length)


async def get_json(port: int, path: str) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _, body = await http_request(reader, writer, path)
    writer.close()
    return json.loads(body)


async def load(port: int, clients: int, texts: list[str], requests: int, seconds: float) -> dict:
    """C closed-loop clients until `requests` answers or `seconds`; latencies in ms."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    start = time.perf_counter()

    async def client(k: int) -> None:
        nonlocal sent, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while sent < requests and time.perf_counter() - start < seconds:
            body = json.dumps({"texts": [texts[sent % len(texts)]]}).encode()
            sent += 1
            t0 = time.perf_counter()
            status, _ = await http_request(reader, writer, "/predict", body)
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += status != 200
        writer.close()

    before = (await get_json(port, "/info"))["batching"][0]
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    after = (await get_json(port, "/info"))["batching"][0]
    passes = after["forward_passes"] - before["forward_passes"]
    return {"clients": clients, "answers": len(latencies), "errors": errors, "wall_s": wall,
            "per_s": len(latencies) / wall, "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "texts_per_pass": (after["items"] - before["items"]) / passes if passes else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def predict_baseline(model: str, texts: list[str], calls: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    latencies = []
    for i in range(calls):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rnnmath", "predict", model, texts[i % len(texts)]], check=True,
                       capture_output=True, env=env)
        latencies.append((time.perf_counter() - t0) * 1000)
    mean = statistics.mean(latencies)
    return {"clients": 1, "answers": calls, "errors": 0, "wall_s": sum(latencies) / 1000, "per_s": 1000 / mean,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "texts_per_pass": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory written by rnnmath train")
    parser.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated (default 1,8,64)")
    parser.add_argument("--requests", type=int, default=2000, help="answers per run at most (default 2000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per run at most (default 20)")
    parser.add_argument("--predict-calls", type=int, default=5, help="rnnmath predict processes (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="serve --threads, and OMP_NUM_THREADS of predict (default 1)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args()

    from rnnmath.data import make_order_task

    texts = make_order_task(500, 1).texts  # sentences of 4-10 words
    clients = [int(c) for c in args.clients.split(",")]
    settings = {"batching on (--max-batch 64 --max-delay-ms 5)": ["--max-batch", "64", "--max-delay-ms", "5"],
                "batching off (--max-batch 1)": ["--max-batch", "1"]}
    rows = []
    load_before = os.getloadavg()
    for name, flags in settings.items():
        process, port = start_server(args.model, flags, args.threads)
        try:
            asyncio.run(load(port, 4, texts, 100, 10))  # warm-up
            for c in clients:
                rows.append({"setting": name, **asyncio.run(load(port, c, texts, args.requests, args.seconds))})
                print(f"{name}: {rows[-1]}", file=sys.stderr)
        finally:
            process.terminate()
            process.wait(timeout=60)
    rows.append({"setting": "one `rnnmath predict` process per request", **predict_baseline(
        args.model, texts, args.predict_calls, args.threads)})
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "server_threads": args.threads, "load_average_before": load_before,
               "load_average_after": os.getloadavg(), "model": str(Path(args.model))}
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}))
        return 0
    print(f"machine: {machine}\n")
    print("| server | clients | answers/s | p50 ms | p99 ms | texts per forward pass | answers (errors) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['clients']} | {r['per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['texts_per_pass']:.1f} | {r['answers']} ({r['errors']}) |")
    return 0



if __name__ == "__main__":
    sys.exit(main())
