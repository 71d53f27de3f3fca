"""The FastAPI app: OpenAI's completions and chat endpoints over an `Engine`.

Endpoints: POST /v1/completions, POST /v1/chat/completions (the checkpoint's chat template;
LLaDA-V: `image_url` parts with base64 `data:` URLs), GET /v1/models, GET /health, GET /metrics.
Handlers only parse, tokenize and await the engine's futures; the sampler runs in the engine's
worker thread. A bad request is HTTP 400 naming the field, a full queue 429, and a client that
goes away (mid-stream or while waiting) has its queued jobs dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from llada_jax.diffusion.sampler import SamplerConfig
from llada_jax.serving import protocol
from llada_jax.serving.answers import Answer
from llada_jax.serving.engine import Engine, EngineClosed, Job, QueueFull
from llada_jax.serving.protocol import RequestError

# How often a waiting non-streaming handler checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.2


@dataclasses.dataclass
class _Prompt:
    ids: list[int]
    images: Any = None   # LLaDA-V: multimodal_data.EncodedConversation


def _sampler_field(message: str) -> tuple[str | None, str]:
    """'config.sampler.steps: expected ...' -> ('steps', 'expected ...')."""
    head, sep, rest = message.partition(": ")
    if sep and head.startswith(("config.sampler.", "sampler.")):
        return head.rsplit(".", 1)[1], rest.replace("sampler.", "")
    return None, message.replace("config.sampler.", "").replace("sampler.", "")


class Server:
    """What the handlers share: the engine, the model's name, and request planning."""

    def __init__(self, engine: Engine, model_name: str, default_seed: int = 0) -> None:
        self.engine, self.model_name, self.default_seed = engine, model_name, default_seed
        self.generator = engine.generator
        self.tokenizer = engine.generator.tokenizer

    # --- planning -------------------------------------------------------------------------------
    def sampler(self, body: protocol.SamplingFields) -> tuple[SamplerConfig, int]:
        """The request's sampler settings and its max_tokens."""
        default = self.engine.default_sampler
        overrides = body.sampler_overrides()
        block = overrides.get("block_length", default.block_length)
        max_tokens = body.max_tokens or default.gen_length
        gen_length = self.engine.gen_length(max_tokens, block)
        limit = self.engine.max_length - 1
        if gen_length > limit:
            raise RequestError("max_tokens", f"{max_tokens} (gen length {gen_length} in blocks of "
                               f"{block}) leaves no room for a prompt in the model's "
                               f"max_sequence_length={self.engine.max_length}")
        if "steps" not in overrides:
            overrides["steps"] = self.engine.default_steps(gen_length, block)
        try:
            sampler = dataclasses.replace(default, gen_length=gen_length, **overrides)
        except ValueError as e:
            field, message = _sampler_field(str(e))
            raise RequestError(field, message) from None
        return sampler, max_tokens

    def completion_prompts(self, body: protocol.CompletionRequest) -> list[_Prompt]:
        return [_Prompt(self.generator.encode_prompt(p, chat=False)) for p in body.prompts()]

    def chat_prompt(self, body: protocol.ChatRequest) -> _Prompt:
        from llada_jax.data import multimodal_data as md

        messages, pictures = [], []
        for i, message in enumerate(body.messages):
            if isinstance(message.content, str):
                text = message.content
            else:
                pieces = []
                for j, part in enumerate(message.content):
                    if isinstance(part, protocol.TextPart):
                        pieces.append(part.text)
                        continue
                    field = f"messages[{i}].content[{j}].image_url.url"
                    picture = protocol.decode_data_url(part.image_url.url, field)
                    if not self.generator.config.vision.enabled:
                        raise RequestError(field, f"model {self.model_name!r} has no vision "
                                           f"tower (not a LLaDA-V checkpoint); send text only")
                    if message.role != "user":
                        raise RequestError(field, "images go in user messages")
                    pictures.append(picture)
                    pieces.append(md.IMAGE_MARK)
                text = "\n".join(pieces)
            messages.append({"role": message.role, "content": text})
        if messages[-1]["role"] == "assistant":
            raise RequestError(f"messages[{len(messages) - 1}].role", "the last message must be "
                               "from the user (or system); the server writes the answer")
        if not pictures:
            return _Prompt(self.tokenizer.render_chat(messages, add_generation_prompt=True))
        processor = md.ImageProcessor.from_config(self.generator.config)
        try:
            encoded = md.encode_conversation(messages, pictures, self.tokenizer, processor,
                                             add_generation_prompt=True)
        except ValueError as e:
            raise RequestError("messages", str(e)) from None
        return _Prompt(encoded.ids, encoded)

    def jobs(self, body: protocol.SamplingFields, prompts: list[_Prompt],
             field: str) -> tuple[list[Job], list[Answer], int]:
        """One job and answer per (prompt, choice), and the prompt tokens counted for usage."""
        if body.model is not None and body.model != self.model_name:
            raise RequestError("model", f"unknown model {body.model!r}; this server serves "
                               f"{self.model_name!r}", status=404, kind="not_found_error")
        sampler, max_tokens = self.sampler(body)
        stops = body.stop_strings()
        seed = self.default_seed if body.seed is None else body.seed
        jobs, answers, prompt_tokens = [], [], 0
        for p, prompt in enumerate(prompts):
            where = field if len(prompts) == 1 else f"{field}[{p}]"
            try:
                self.generator.check_prompt_length(sampler, len(prompt.ids), where)
            except ValueError as e:
                raise RequestError(None, str(e)) from None
            width = self.engine.prompt_width(len(prompt.ids), sampler.gen_length)
            prompt_tokens += len(prompt.ids)
            for choice in range(body.n):
                jobs.append(Job(prompt.ids, sampler, width, seed=seed + choice,
                                images=prompt.images))
                answers.append(Answer(self.tokenizer, max_tokens, stops))
        return jobs, answers, prompt_tokens

    def submit(self, jobs: list[Job]) -> None:
        submitted = []
        try:
            for job in jobs:
                self.engine.submit(job)
                submitted.append(job)
        except QueueFull as e:
            for job in submitted:
                self.engine.cancel(job)
            raise RequestError(None, str(e), status=429, kind="rate_limit_error") from None
        except EngineClosed as e:
            raise RequestError(None, str(e), status=503, kind="server_error") from None

    # --- handlers -------------------------------------------------------------------------------
    async def handle(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        start = time.monotonic()
        try:
            model = protocol.ChatRequest if chat else protocol.CompletionRequest
            body = protocol.parse(await request.body(), model)
            if chat:
                prompts = [self.chat_prompt(body)]
            else:
                prompts = self.completion_prompts(body)
            jobs, answers, prompt_tokens = self.jobs(body, prompts,
                                                     "messages" if chat else "prompt")
            if body.stream:
                loop = asyncio.get_running_loop()
                events: asyncio.Queue = asyncio.Queue()
                for k, job in enumerate(jobs):
                    job.on_block = (lambda block, ids, k=k:
                                    loop.call_soon_threadsafe(events.put_nowait, (k, block, ids)))
            self.submit(jobs)
        except RequestError as e:
            self.engine.metrics.request_done(endpoint, e.status)
            return JSONResponse(e.body(), status_code=e.status)
        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            for k, job in enumerate(jobs):
                job.future.add_done_callback(
                    lambda future, k=k: loop.call_soon_threadsafe(events.put_nowait,
                                                                  (k, None, future)))
            return StreamingResponse(
                self._stream(jobs, answers, events, request_id, chat, endpoint, start),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, jobs, answers, prompt_tokens, request_id, chat,
                                    endpoint, start)

    async def _complete(self, request: Request, jobs: list[Job], answers: list[Answer],
                        prompt_tokens: int, request_id: str, chat: bool, endpoint: str,
                        start: float) -> Response:
        waiting = asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=_DISCONNECT_POLL_SECONDS)
            if done:
                break
            if await request.is_disconnected():
                for job in jobs:
                    self.engine.cancel(job)
                waiting.cancel()
                self.engine.metrics.request_done(endpoint, 499)
                return Response(status_code=499)
        try:
            results = waiting.result()
        except Exception as e:   # the batch failed: the server goes on
            self.engine.metrics.request_done(endpoint, 500)
            error = RequestError(None, f"generation failed: {e}", status=500, kind="server_error")
            return JSONResponse(error.body(), status_code=500)
        choices, completion_tokens = [], 0
        for k, (answer, generated) in enumerate(zip(answers, results, strict=True)):
            answer.finish(generated)
            completion_tokens += answer.completion_tokens
            choices.append(protocol.completion_choice(k, answer.text, answer.finish_reason,
                                                      chat))
        self.engine.metrics.add("generated_tokens", completion_tokens)
        self.engine.metrics.request_done(endpoint, 200, time.monotonic() - start)
        return JSONResponse(protocol.completion_body(
            request_id, self.model_name, choices,
            protocol.usage(prompt_tokens, completion_tokens), chat))

    async def _stream(self, jobs: list[Job], answers: list[Answer], events: asyncio.Queue,
                      request_id: str, chat: bool, endpoint: str,
                      start: float) -> AsyncIterator[str]:
        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        first = [True] * len(jobs)
        finished, status = 0, 499
        try:
            while finished < len(jobs):
                k, block, payload = await events.get()
                if block is None:
                    if payload.cancelled():
                        continue
                    if payload.exception() is not None:
                        status = 500
                        yield event({"error": {"message": f"generation failed: "
                                               f"{payload.exception()}", "type": "server_error"}})
                        return
                    delta = answers[k].finish(payload.result())
                    finished += 1
                    self.engine.metrics.add("generated_tokens", answers[k].completion_tokens)
                    yield event(protocol.chunk_body(request_id, self.model_name, k, delta,
                                                    answers[k].finish_reason, chat, first[k]))
                    first[k] = False
                    continue
                delta = answers[k].add_block(block, payload)
                if delta:
                    yield event(protocol.chunk_body(request_id, self.model_name, k, delta, None,
                                                    chat, first[k]))
                    first[k] = False
            status = 200
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:   # a client gone mid-stream: its queued jobs free their slots
                self.engine.cancel(job)
            self.engine.metrics.request_done(endpoint, status, time.monotonic() - start
                                             if status == 200 else None)


def make_app(engine: Engine, model_name: str, default_seed: int = 0) -> FastAPI:
    """The ASGI app; closing it (uvicorn's shutdown) drains the engine."""
    server = Server(engine, model_name, default_seed)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="llada_jax", lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.handle(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llada_jax"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "slots_in_use": engine.slots_in_use()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    return app
