"""The OpenAI-compatible request and response bodies of the server, and their validation.

Requests are parsed from raw bytes here (not by FastAPI), so every bad input becomes one
`RequestError` whose message names the field (`messages[1].content[0].image_url.url: ...`),
answered as HTTP 400 in OpenAI's error shape. The diffusion sampler's options ride along as
extra body fields (`steps`, `block_length`, `cfg_scale`, `remasking`, `cache`, `threshold`,
`factor`), which the `openai` client sends with `extra_body=`.

This module does not tokenize or sample: see `engine.py` and `app.py`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

# Body fields some OpenAI clients send that change nothing here; any other unknown field is an
# error (a misspelt `step` must not be silently ignored).
IGNORED_FIELDS = ("user", "stream_options", "logit_bias", "response_format")


class RequestError(Exception):
    """A client error: HTTP `status` with a one-line message naming `field`."""

    def __init__(self, field: str | None, message: str, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.status, self.kind = field, status, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.field,
                          "code": None}}


class SamplingFields(BaseModel):
    """What both endpoints accept beside the prompt: OpenAI's fields and the sampler's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    # A PRNG key reads its seed as int64; choice k of the n <= 16 choices samples with seed + k
    # (an out-of-range seed would otherwise fail the whole batch its rows share).
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 16)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: Any = None
    # The diffusion sampler's options (SamplerConfig fields of the same names).
    steps: int | None = Field(None, ge=1)
    block_length: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0)
    remasking: Literal["low_confidence", "random"] | None = None
    cache: Literal["none", "prefix", "dual"] | None = None
    threshold: float | None = Field(None, ge=0, le=1)
    factor: float | None = Field(None, ge=0)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for i, s in enumerate(stops):
            if not s:
                raise RequestError(f"stop[{i}]", "expected a non-empty string")
        if len(stops) > 4:
            raise RequestError("stop", f"expected at most 4 stop strings, found {len(stops)}")
        return stops

    def check_unsupported(self) -> None:
        """OpenAI fields this sampler cannot honour: refused unless at their neutral value."""
        if self.top_p is not None and self.top_p != 1:
            raise RequestError("top_p", f"expected 1 (nucleus sampling is not supported by the "
                               f"diffusion sampler), found {self.top_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value not in (None, 0):
                raise RequestError(name, f"expected 0 (not supported), found {value}")
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs", "log probabilities are not supported; omit the field")

    def sampler_overrides(self) -> dict[str, Any]:
        """The per-request SamplerConfig overrides (fields the request set)."""
        names = ("temperature", "steps", "block_length", "cfg_scale", "remasking", "cache",
                 "threshold", "factor")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class CompletionRequest(SamplingFields):
    prompt: str | list[str]

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise RequestError("prompt", "expected a string or a non-empty list of strings")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


def _location(loc: tuple) -> str:
    """pydantic's error location as a field path: ('messages', 0, 'content') ->
    messages[0].content (union branch names dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "int", "float", "bool") or "[" in str(part) \
                or str(part).endswith("Part") or str(part).startswith(("function-", "literal")):
            continue   # a union branch, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "request body"


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """The request model of a JSON body; RequestError naming the field otherwise."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError("request body", f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError("request body", f"expected a JSON object, found "
                           f"{type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
    # JSON has no float/int distinction for whole numbers: accept 1 where a float is expected.
    for name in ("temperature", "top_p", "cfg_scale", "threshold", "factor",
                 "frequency_penalty", "presence_penalty"):
        if isinstance(data.get(name), int) and not isinstance(data.get(name), bool):
            data[name] = float(data[name])
    try:
        request = model.model_validate(data)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        where = _location(error["loc"])
        if error["type"] == "extra_forbidden":
            raise RequestError(where, "unknown field") from None
        found = error.get("input")
        shown = "" if isinstance(found, (dict, list)) or found is None else \
            f", found {found!r}"
        raise RequestError(where, f"{error['msg'].lower()}{shown}") from None
    request.check_unsupported()
    return request


def decode_data_url(url: str, field: str) -> Any:
    """A PIL RGB image from a `data:image/png;base64,...` URL; RequestError naming `field`."""
    from PIL import Image, UnidentifiedImageError

    from llada_jax.data import images

    if not url.startswith("data:"):
        raise RequestError(field, "expected a data: URL (data:image/png;base64,...); the server "
                           "does not fetch remote images")
    header, _, payload = url.partition(",")
    if ";base64" not in header or not payload:
        raise RequestError(field, "expected a base64 data URL (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(field, f"the base64 payload does not decode ({e})") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            rgb = images.to_rgb(image, source=field)
            return rgb.copy() if rgb is image else rgb
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise RequestError(field, f"not a readable PNG/JPEG image ({e})") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, choices: list[dict], usage_: dict,
                    chat: bool) -> dict:
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage_}


def completion_choice(index: int, text: str, finish_reason: str, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def chunk_body(request_id: str, model: str, index: int, text: str, finish_reason: str | None,
               chat: bool, first: bool = False) -> dict:
    """One server-sent event of a streamed answer (OpenAI's chunk format)."""
    if chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice]}
