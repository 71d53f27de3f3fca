"""launch/serve.py end to end: a real server subprocess on 127.0.0.1, the official `openai` client.

One server (tiny random checkpoint, one prompt width, gen length 8 in blocks of 4, batch size 8,
a 200 ms batch window) serves every test of the module in order; the last one stops it with
SIGTERM. Expected answers come from the library generation API run in this process (the
request alone, greedy), or from the same request sent to the server alone.
"""

import base64
import concurrent.futures
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import openai
import pytest
from PIL import Image

from llada_jax import generation, parallel
from llada_jax.config import default_config, model_config
from llada_jax.model.transformer import Transformer
from llada_jax.serving.metrics import parse as parse_metrics
from llada_jax.train.checkpoint import save_params
from tests.test_program_runner import one_device_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny"
MAX_QUEUE = 24


class _Response:
    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def _request(url: str, method: str = "GET", body: bytes | None = None) -> _Response:
    """One HTTP request with the standard library (the raw bytes we send are the point)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return _Response(response.status, response.read().decode())
    finally:
        connection.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, checkpoint: str, port: int, log_path: str):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   XLA_FLAGS=one_device_xla_flags())   # one CPU device (the test process fakes 8)
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "launch", "serve.py"),
             f"--checkpoint={checkpoint}", f"--port={port}", f"--model_name={MODEL}",
             "--prompt_buckets=32", "--gen_buckets=8", "--batch_sizes=8", "--max_batch=8",
             "--batch_window_ms=200", f"--max_queue={MAX_QUEUE}", "--mesh_fsdp=1"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.log_path = log_path
        self.started = False

    def ready(self) -> "_Server":
        """Waits until the server answers (it loads and compiles while the test goes on)."""
        if self.started:
            return self
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.output()}")
            try:
                if _request(f"{self.url}/health").status_code == 200:
                    self.started = True
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"server did not start: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(_request(f"{self.ready().url}/metrics").text)

    def post(self, path: str, body) -> _Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return _request(f"{self.ready().url}{path}", "POST", content)

    def slots(self) -> int:
        return _request(f"{self.ready().url}/health").json()["slots_in_use"]

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = default_config()
    config.model.init_std = 0.3   # spread-out logits: no near-ties between batch layouts
    config.sampler.gen_length, config.sampler.block_length, config.sampler.steps = 8, 4, 4
    model = Transformer(model_config(config))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"])
    directory = str(tmp_path_factory.mktemp("ckpt") / MODEL)
    save_params(directory, config, params)
    return directory


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    running = _Server(checkpoint, _free_port(), str(tmp_path_factory.mktemp("log") / "log"))
    yield running
    running.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.ready().url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    return _client(server)


def test_completion_and_chat_equal_the_library_alone(server, checkpoint):
    # The library's answers first (the server compiles meanwhile).
    one_device = default_config()
    one_device.mesh.fsdp = 1
    gen = generation.Generator.load(checkpoint,
                                    mesh=parallel.make_mesh(one_device, jax.devices()[:1]))
    sampler = gen.sampler()   # gen 8, block 4, steps 4: the server's defaults
    expected_completion, expected_chat = (
        gen.generate_text(["abc"], sampler, prompt_bucket=32)[0],
        gen.generate_text(["hello"], sampler, chat=True, prompt_bucket=32)[0])
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="abc", max_tokens=8)
    chat = client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "hello"}])
    assert completion.choices[0].text == expected_completion
    assert chat.choices[0].message.content == expected_chat
    assert chat.choices[0].message.role == "assistant"
    # usage: BOS + 3 characters; the answer's tokens (1 character = 1 token here)
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == len(expected_completion)
    assert completion.choices[0].finish_reason in ("stop", "length")
    # max_tokens cuts the answer (same gen length bucket, so the same tokens)
    short = client.completions.create(model=MODEL, prompt="abc", max_tokens=3)
    assert short.choices[0].text == expected_completion[:3]


def test_streaming_sends_one_chunk_per_block_then_done(server, client):
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}]).choices[0].message.content
    assert len(whole) > 4   # the answer outlasts the first block of 4 tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True))
    texts = [c.choices[0].delta.content for c in chunks]
    assert "".join(texts) == whole
    assert texts[0] == whole[:4] and chunks[0].choices[0].delta.role == "assistant"
    assert len([t for t in texts if t]) == 2   # block 0, then block 1
    assert chunks[-1].choices[0].finish_reason is not None   # then the finish reason
    raw = server.post("/v1/completions", {"prompt": "abc", "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def _wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_is_429_and_the_server_goes_on(server):
    # 16 choices at a temperature not compiled yet hold 16 of the 24 slots for a while (the
    # compile, then two batches of 8), and 16 more do not fit.
    body = {"prompt": "ab", "n": 16, "temperature": 0.7, "seed": 1}
    first = {}
    thread = threading.Thread(target=lambda: first.update(r=server.post("/v1/completions",
                                                                        body)))
    thread.start()
    assert _wait_for(lambda: server.slots() >= 16)
    refused = server.post("/v1/completions", body)
    assert refused.status_code == 429
    assert "the queue is full (24 requests waiting or running)" in \
        refused.json()["error"]["message"]
    thread.join()
    assert first["r"].status_code == 200 and len(first["r"].json()["choices"]) == 16
    assert server.slots() == 0


def test_n_choices_and_seeds(server, client):
    greedy = client.completions.create(model=MODEL, prompt="xy", n=3, max_tokens=8)
    assert len({c.text for c in greedy.choices}) == 1 and len(greedy.choices) == 3
    sampled = client.completions.create(model=MODEL, prompt="xy", n=2, temperature=0.7, seed=5)
    alone = [client.completions.create(model=MODEL, prompt="xy", temperature=0.7, seed=s)
             for s in (5, 6)]
    assert [c.text for c in sampled.choices] == [a.choices[0].text for a in alone]
    assert [c.index for c in sampled.choices] == [0, 1]


def test_concurrent_requests_are_batched_equal_alone_and_compile_nothing(server, client):
    prompts = [("q" * (i % 5 + 1)) + chr(ord("a") + i) for i in range(16)]
    before = server.metrics()

    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8).choices[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    after = server.metrics()
    batches = after["llada_batches_total"] - before["llada_batches_total"]
    assert after["llada_batch_requests_total"] - before["llada_batch_requests_total"] == 16
    assert batches <= 4, f"16 requests in {batches} batches"
    alone = [ask(p) for p in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    # Every request was inside the buckets: nothing was compiled after warm-up.
    assert server.metrics()["llada_compilations_total"] == before["llada_compilations_total"]
    assert after["llada_warmup_compilations"] > 0


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "request body: not valid JSON"),
    ({"prompt": "a", "max_tokens": "many"}, 400, "max_tokens: input should be a valid integer"),
    ({"prompt": "a", "step": 4}, 400, "step: unknown field"),
    ({"prompt": "a", "steps": 3}, 400, "steps: expected a positive multiple of the number of "
                                      "blocks"),
    ({"prompt": "a", "remasking": "best"}, 400, "remasking: input should be 'low_confidence'"),
    ({"prompt": "a", "top_p": 0.5}, 400, "top_p: expected 1"),
    ({"prompt": "a" * 200}, 400, "prompt: the prompt has 201 tokens"),
    ({"prompt": "a", "max_tokens": 500}, 400, "max_tokens: 500"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model: unknown model 'gpt-4'"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     400, "messages[0].content[1].image_url.url: not a readable PNG/JPEG image"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png()}"}}]}]},
     400, "messages[0].content[0].image_url.url: model 'tiny' has no vision tower"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role: input should "
                                                             "be 'system', 'user' or"),
])
def test_bad_input_is_refused_naming_the_field(server, body, status, message):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body \
        else "/v1/completions"
    response = server.post(path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"].startswith(message), response.json()
    assert server.post("/v1/completions", {"prompt": "ab"}).status_code == 200


def test_openai_client_sees_the_400_message(client):
    with pytest.raises(openai.BadRequestError, match="steps: expected a positive multiple"):
        client.completions.create(model=MODEL, prompt="a", extra_body={"steps": 3})


def test_disconnect_mid_stream_frees_the_slots(server):
    before = server.metrics()["llada_cancelled_total"]
    body = {"prompt": "ab", "n": 16, "temperature": 0.7, "seed": 2, "stream": True}
    port = int(server.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    while not response.readline().startswith(b"data: "):
        pass   # the first block of the first choice arrived: go away
    connection.close()
    assert _wait_for(lambda: server.slots() == 0)
    assert server.metrics()["llada_cancelled_total"] > before
    assert server.post("/v1/completions", {"prompt": "ab"}).status_code == 200


def test_sigterm_finishes_requests_in_flight_then_exits(server):
    body = {"prompt": "ab", "n": 8, "temperature": 0.7, "seed": 3}
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=server.post("/v1/completions",
                                                                         body)))
    thread.start()
    assert _wait_for(lambda: server.slots() >= 1)
    server.process.send_signal(signal.SIGTERM)
    thread.join()
    assert answer["r"].status_code == 200 and len(answer["r"].json()["choices"]) == 8
    assert server.process.wait(timeout=30) == 0, server.output()
