"""An OpenAI-compatible HTTP server for a LLaDA or LLaDA-V checkpoint.

    python launch/serve.py --checkpoint=/ckpt/llada-instruct --port=8000
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "llada-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true),
GET /v1/models, GET /health, GET /metrics (Prometheus text). See docs/serving.md.

Every sampler flag of launch/generate.py sets the server's default (requests may override
`steps`, `block_length`, `temperature`, `cfg_scale`, `remasking`, `cache`, `threshold`,
`factor`). Concurrent requests with the same settings are batched (--max_batch, waiting at most
--batch_window_ms for a batch to fill); prompt widths, gen lengths and batch sizes are rounded up
to --prompt_buckets, --gen_buckets and --batch_sizes, and every program those lists name is
compiled before the server starts listening (warm-up), so requests inside them never wait for a
compile. The server listens on 127.0.0.1 unless --host says otherwise. SIGTERM (or Ctrl-C)
stops taking requests, finishes the ones in flight, and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import program
import sampling_flags as sf
from absl import flags

_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every "
                            "interface; the server has no authentication)")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port", lower_bound=1, upper_bound=65535)
_MODEL_NAME = flags.DEFINE_string("model_name", None, "the model id clients send (default: the "
                                  "checkpoint directory's name)")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "most requests (choices) in one sampler batch",
                                  lower_bound=1)
_BATCH_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 10.0, "how long the oldest waiting "
                                      "request waits for others to share its batch",
                                      lower_bound=0)
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "requests (choices) waiting or running; more "
                                  "are refused with HTTP 429", lower_bound=1)
_PROMPT_BUCKETS = flags.DEFINE_list("prompt_buckets", ["64", "256", "1024"],
                                    "prompt widths (tokens) prompts are left-padded to")
_GEN_BUCKETS = flags.DEFINE_list("gen_buckets", [], "generation lengths max_tokens is rounded "
                                 "up to (default: the sampler's gen_length)")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", [], "batch sizes (multiples of the mesh's batch "
                                 "axes; default: powers of two up to --max_batch)")
_WARMUP = flags.DEFINE_bool("warmup", True, "compile every bucketed program before listening")


def _int_list(flag: flags.FlagHolder) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in flag.value)
    except ValueError:
        raise ValueError(f"--{flag.name}: expected comma-separated integers, found "
                         f"{','.join(flag.value)!r}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    import uvicorn

    from llada_jax.serving.app import make_app
    from llada_jax.serving.engine import Engine, EngineSettings

    buckets = {f.name: _int_list(f) for f in (_PROMPT_BUCKETS, _GEN_BUCKETS, _BATCH_SIZES)}
    generator = sf.load()
    sampler = sf.sampler_config(generator)
    settings = EngineSettings(
        max_batch=_MAX_BATCH.value, batch_window=_BATCH_WINDOW_MS.value / 1e3,
        max_queue=_MAX_QUEUE.value, prompt_buckets=buckets["prompt_buckets"],
        gen_buckets=buckets["gen_buckets"] or (sampler.gen_length,),
        batch_sizes=buckets["batch_sizes"])
    for g in settings.gen_buckets:
        if g % sampler.block_length:
            raise ValueError(f"--gen_buckets: {g} is not a multiple of the block length "
                             f"{sampler.block_length} (--block_length)")
    engine = Engine(generator, sampler, settings)
    name = _MODEL_NAME.value or os.path.basename(os.path.normpath(sf.CHECKPOINT.value))
    if _WARMUP.value:
        start = time.perf_counter()
        count = engine.warm_up()
        print(f"warm-up: {count} programs, {engine.metrics.warmup_compilations} compilations, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    engine.start()
    app = make_app(engine, name, default_seed=sf.seed(generator))
    print(f"serving {name!r} on http://{_HOST.value}:{_PORT.value} (max_batch "
          f"{settings.max_batch}, batch sizes {list(engine.settings.batch_sizes)})",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=_HOST.value, port=_PORT.value,
                                           log_level="warning", timeout_graceful_shutdown=None))
    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal under the handler found at
    # start: make that one a no-op, so a drained server exits normally (status 0).
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: None)
    server.run()
    if not server.started:
        raise OSError(f"--host={_HOST.value} --port={_PORT.value}: could not listen there "
                      f"(address in use or not available)")
    print("server stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    program.run(main)
