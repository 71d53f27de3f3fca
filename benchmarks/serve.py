"""Serving throughput and latency: N concurrent clients against the same requests one at a time.

    python benchmarks/serve.py                       # tiny random model, 8 clients, 20 s each
    python benchmarks/serve.py --clients=16 --seconds=30 --max_batch=16
    python benchmarks/serve.py --checkpoint=/ckpt/llada-instruct --gen_length=128 \\
        --block_length=32 --steps=128 --clients=8 --extra='{"cache": "dual", "threshold": 0.9}'

Starts launch/serve.py as a subprocess on 127.0.0.1 (a free port; loopback only), waits for its
warm-up, then runs two phases of --seconds each with the same greedy completion requests
(prompts of a few lengths, all inside the first prompt bucket, `max_tokens` = the gen length):
`sequential` (one client, one request at a time: a lone request's latency) and `concurrent`
(--clients threads, each sending its next request when the last one is answered). Prints one
JSON object: per phase the requests answered, requests/s, generated tokens/s and p50/p95
latency, the server's batch metrics (batches, mean requests per batch, mean seconds per batch in
the sampler, the fraction of the phase the sampler ran, compilations after warm-up), and
`throughput_speedup` = concurrent / sequential requests/s and `p95_over_lone_p50` = concurrent
p95 / sequential p50 (targets on the tiny CPU model: >= 3 and <= 2). `benchmarks/serve_cost.py`
times the sampler alone at each batch size (what bounds these two figures).

Without --checkpoint a tiny random-weight model is written to a temporary directory (init_std
0.3; the numbers measure the server and the program, not the model's answers).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint to serve (default: a tiny "
                                  "random model)")
_CLIENTS = flags.DEFINE_integer("clients", 8, "concurrent clients")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "duration of each phase")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "the server's --max_batch")
_BATCH_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 10.0, "the server's --batch_window_ms")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 32, "tokens per answer (max_tokens)")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "block length")
_STEPS = flags.DEFINE_integer("steps", 32, "sampling steps")
_PROMPT_BUCKET = flags.DEFINE_integer("prompt_bucket", 32, "the server's one prompt width")
_EXTRA = flags.DEFINE_string("extra", "{}", "JSON object of extra request fields (sampler "
                             "options: cache, threshold, ...)")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "the server's --mesh_fsdp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The cat", "Once upon a time", "A B C D", "Hello there, friend", "Why is the sky",
           "One two three four five", "Paris is", "Numbers: 1 2 3"]


def _tiny_checkpoint(directory: str) -> str:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llada_jax.config import default_config, model_config
    from llada_jax.model.transformer import Transformer
    from llada_jax.train.checkpoint import save_params

    config = default_config()
    config.model.init_std = 0.3
    model = Transformer(model_config(config))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"])
    path = os.path.join(directory, "tiny")
    save_params(path, config, params)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(connection: http.client.HTTPConnection, path: str, body: dict) -> dict:
    connection.request("POST", path, body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data}")
    return data


def _metrics(port: int) -> dict[str, float]:
    from llada_jax.serving.metrics import parse

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return parse(text)


def _phase(port: int, clients: int, seconds: float, extra: dict) -> dict:
    """Each client sends requests back to back for `seconds`; latencies of every answer."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    before = _metrics(port)

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        k = index
        while time.monotonic() < stop_at:
            body = {"prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": _GEN_LENGTH.value,
                    **extra}
            start = time.monotonic()
            answer = _post(connection, "/v1/completions", body)
            with lock:
                latencies.append(time.monotonic() - start)
                tokens[0] += answer["usage"]["completion_tokens"]
            k += clients
        connection.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    after = _metrics(port)
    batches = after["llada_batches_total"] - before["llada_batches_total"]
    rows = after["llada_batch_requests_total"] - before["llada_batch_requests_total"]
    busy = after["llada_sampler_busy_seconds_total"] - before["llada_sampler_busy_seconds_total"]
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies),
            "requests_per_second": round(len(latencies) / elapsed, 3),
            "completion_tokens_per_second": round(tokens[0] / elapsed, 1),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 4),
            "batches": int(batches), "mean_requests_per_batch": round(rows / max(batches, 1), 2),
            "mean_batch_s": round(busy / max(batches, 1), 4),
            "sampler_busy_fraction": round(busy / elapsed, 3),
            "compilations": int(after["llada_compilations_total"]
                                - before["llada_compilations_total"])}


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    extra = json.loads(_EXTRA.value)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _CHECKPOINT.value or _tiny_checkpoint(tmp)
        port = _free_port()
        env = dict(os.environ, PYTHONPATH=ROOT)
        command = [sys.executable, os.path.join(ROOT, "launch", "serve.py"),
                   f"--checkpoint={checkpoint}", f"--port={port}",
                   f"--prompt_buckets={_PROMPT_BUCKET.value}",
                   f"--gen_buckets={_GEN_LENGTH.value}", f"--gen_length={_GEN_LENGTH.value}",
                   f"--block_length={_BLOCK_LENGTH.value}", f"--steps={_STEPS.value}",
                   f"--max_batch={_MAX_BATCH.value}",
                   f"--batch_window_ms={_BATCH_WINDOW_MS.value}",
                   f"--max_queue={max(64, 2 * _CLIENTS.value)}",
                   f"--mesh_fsdp={_MESH_FSDP.value}"]
        log = open(os.path.join(tmp, "server.log"), "w")
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            while True:
                if server.poll() is not None:
                    log.flush()
                    sys.exit(f"the server exited: {open(log.name).read()[-2000:]}")
                try:
                    _metrics(port)
                    break
                except OSError:
                    time.sleep(0.5)
            startup = time.monotonic() - started
            sequential = _phase(port, 1, _SECONDS.value, extra)
            concurrent = _phase(port, _CLIENTS.value, _SECONDS.value, extra)
        finally:
            server.terminate()
            server.wait(timeout=120)
            log.close()
    speedup = concurrent["requests_per_second"] / sequential["requests_per_second"]
    p95_ratio = concurrent["latency_p95_s"] / sequential["latency_p50_s"]
    print(json.dumps({
        "checkpoint": _CHECKPOINT.value or "tiny (random)", "gen_length": _GEN_LENGTH.value,
        "block_length": _BLOCK_LENGTH.value, "steps": _STEPS.value, "extra": extra,
        "max_batch": _MAX_BATCH.value, "batch_window_ms": _BATCH_WINDOW_MS.value,
        "startup_and_warmup_s": round(startup, 1), "sequential": sequential,
        "concurrent": concurrent, "throughput_speedup": round(speedup, 2),
        "p95_over_lone_p50": round(p95_ratio, 2),
        "targets_met": bool(speedup >= 3 and p95_ratio <= 2)}, indent=1))


if __name__ == "__main__":
    app.run(main)
