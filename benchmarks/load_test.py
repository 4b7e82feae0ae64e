"""A bounded load test of `scripts/serve.py` on loopback: concurrent clients, mixed requests, some invalid.

    python benchmarks/load_test.py runs/quick/onnx-int8 --clients 8 --seconds 30 --out docs/load.jsonl

Starts the server on a free port, asks each question of a pool of SQuAD dev questions alone once (the reference),
then runs --clients threads for --seconds, each sending requests back to back: one question, a list of 2-4, or
(--invalid-share) an invalid one (malformed JSON, a missing field, an empty question, a passage over the limit).
Reports throughput, latency p50/p95/max of valid requests, errors on valid requests (any non-200), invalid requests
not refused with a 4xx, answers not matched to their question (id, question and `context[start:end] == answer`),
answers that differ from the question answered alone (batching changes padding; int8 quantizes each batch's
activations with its own scale), and the server's resident memory (after warm-up, every 5 s, at the end,
highest).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder to serve (PyTorch or exported)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the load runs (default: %(default)s)")
    p.add_argument("--pool", type=int, default=200, help="dev questions to draw from (default: %(default)s)")
    p.add_argument("--data", default="dev-v1.1", help="where the questions come from (default: %(default)s)")
    p.add_argument("--list-share", type=float, default=0.3, help="share of list requests (default: %(default)s)")
    p.add_argument("--invalid-share", type=float, default=0.1, help="share of invalid requests (default: %(default)s)")
    p.add_argument("--server-args", default="", help="extra flags for serve.py, e.g. '--max-batch 16'")
    p.add_argument("--out", type=Path, help="append the summary as one JSON line here")
    return p.parse_args(argv)


class Client:
    """One keep-alive connection: `post(body) -> (status, parsed JSON, seconds)`."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, body: bytes) -> tuple[int, Any, float]:
        t0 = time.perf_counter()
        self.conn.request("POST", "/answer", body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = json.loads(response.read())
        return response.status, data, time.perf_counter() - t0


def invalid_body(rng: random.Random, record: dict[str, Any]) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return b'{"question": "who'
    if kind == 1:
        return json.dumps({"question": record["question"]}).encode()
    if kind == 2:
        return json.dumps({**record, "question": " "}).encode()
    return json.dumps({**record, "context": "x " * 20_000}).encode()


def start_server(model: str, extra: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), model, "--port", str(port), *extra.split()]
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open while the server runs) a file, not a pipe: a pipe nobody reads would block the server when full
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, port
        except OSError:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"serve.py ended: {log.read()[-3000:]}") from None
            time.sleep(0.3)
    server.kill()
    raise RuntimeError("serve.py did not start listening within 300 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client_loop(
    port: int, seed: int, pool: list[dict], reference: dict, args: argparse.Namespace, stop: float, out: dict[str, list]
) -> None:
    rng, client = random.Random(seed), Client(port)
    while time.monotonic() < stop:
        if rng.random() < args.invalid_share:
            status, data, _ = client.post(invalid_body(rng, rng.choice(pool)))
            out["invalid"].append(status)
            continue
        chosen = rng.sample(pool, rng.randint(2, 4)) if rng.random() < args.list_share else [rng.choice(pool)]
        body = json.dumps(chosen if len(chosen) > 1 else chosen[0]).encode()
        status, data, seconds = client.post(body)
        out["latency"].append(seconds)
        out["questions"].append(len(chosen))
        if status != 200:
            out["errors"].append(status)
            continue
        answers = data if isinstance(data, list) else [data]
        for q, a in zip(chosen, answers, strict=True):
            matched = a["id"] == q["id"] and a["question"] == q["question"]
            if not matched or (a["start"] is not None and q["context"][a["start"] : a["end"]] != a["answer"]):
                out["mismatched"].append(q["id"])
            out["same"].append(a["answer"] == reference[q["id"]])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bertqa.sources import load_examples

    examples, _ = load_examples(args.data, max_examples=args.pool, seed=0)
    pool = [{"id": ex.id, "question": ex.question, "context": ex.context} for ex in examples]
    server, port = start_server(args.model, args.server_args)
    try:
        solo = Client(port)
        reference = {q["id"]: solo.post(json.dumps(q).encode())[1]["answer"] for q in pool}  # also the warm-up
        rss_start = rss_mib(server.pid)
        out: dict[str, list] = {k: [] for k in ("latency", "questions", "errors", "invalid", "mismatched", "same")}
        stop = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=client_loop, args=(port, seed, pool, reference, args, stop, out))
            for seed in range(args.clients)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        rss = []
        while any(t.is_alive() for t in threads):
            rss.append(rss_mib(server.pid))
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    latency = np.array(out["latency"]) * 1000
    summary = {
        "model": args.model,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "valid_requests": len(latency),
        "questions": int(sum(out["questions"])),
        "requests_per_s": len(latency) / elapsed,
        "questions_per_s": sum(out["questions"]) / elapsed,
        "p50_ms": float(np.percentile(latency, 50)),
        "p95_ms": float(np.percentile(latency, 95)),
        "max_ms": float(latency.max()),
        "errors_on_valid": len(out["errors"]),
        "invalid_requests": len(out["invalid"]),
        "invalid_not_refused": sum(not 400 <= s < 500 for s in out["invalid"]),
        "mismatched_answers": len(out["mismatched"]),
        "same_as_alone": float(np.mean(out["same"])),
        "rss_mib_start": rss_start,
        "rss_mib_end": rss[-1],
        "rss_mib_max": max(rss),
        "rss_mib_every_5s": [round(r) for r in rss[::10]],
    }
    print(json.dumps(summary))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(summary) + "\n")
    bad = summary["errors_on_valid"] + summary["invalid_not_refused"] + summary["mismatched_answers"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
