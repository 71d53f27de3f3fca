"""LLaDA-V through the serving engine: `image_url` data URLs become the same prompt and views as
`launch/chat.py --image` builds, and a batch of image requests answers each row as the library
generation API answers it alone (random tiny LLaDA-V weights, one CPU device)."""

import base64
import importlib.util
import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from llada_jax import generation, parallel
from llada_jax.data import multimodal_data as md
from llada_jax.data.tokenizer import load_tokenizer
from llada_jax.serving import protocol
from llada_jax.serving.app import Server
from llada_jax.serving.engine import Engine, EngineSettings, Job
from llada_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_v_config():
    spec = importlib.util.spec_from_file_location(
        "llada_v_tiny", os.path.join(ROOT, "configs", "llada_v_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.init_std = 0.3
    config.sampler.early_exit = False   # random weights: run every block
    return config


@pytest.fixture(scope="module")
def engine():
    config = _tiny_v_config()
    config.mesh.fsdp = 1
    model = state_lib.make_model(config)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 2), jnp.int32))["params"])
    gen = generation.Generator(config, model, params, load_tokenizer(config.data.tokenizer),
                               parallel.make_mesh(config, jax.devices()[:1]))
    return Engine(gen, gen.sampler(), EngineSettings(prompt_buckets=(64,), gen_buckets=(12,),
                                                     batch_sizes=(1, 2), max_batch=2))


def _data_url(colour) -> tuple[str, Image.Image]:
    image = Image.new("RGB", (40, 24), colour)
    image.paste((255, 255, 255), (5, 5, 15, 15))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), image


def test_image_requests_batch_like_lone_library_calls(engine):
    server = Server(engine, "tiny_v")
    gen = engine.generator
    processor = md.ImageProcessor.from_config(gen.config)
    prompts = []
    for colour, question in (((200, 30, 30), "Colour?"), ((30, 30, 200), "What shape is it?")):
        url, image = _data_url(colour)
        body = protocol.parse(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": question}]}]}).encode(), protocol.ChatRequest)
        prompt = server.chat_prompt(body)
        # As launch/chat.py --image builds it: "<image>\n" before the text of the first message.
        expected = md.encode_conversation([{"role": "user", "content": "<image>\n" + question}],
                                          [image], gen.tokenizer, processor,
                                          add_generation_prompt=True)
        assert prompt.ids == expected.ids
        np.testing.assert_array_equal(prompt.images.views, expected.views)
        prompts.append(prompt)
    sampler = gen.sampler()
    width = engine.prompt_width(max(len(p.ids) for p in prompts), sampler.gen_length)
    jobs = [Job(p.ids, sampler, width, images=p.images) for p in prompts]
    engine._run(jobs)   # one batch of both image requests, as the worker runs it
    for job, prompt in zip(jobs, prompts, strict=True):
        alone = gen.generate_ids([prompt.ids], sampler, images=[prompt.images],
                                 prompt_bucket=64)
        np.testing.assert_array_equal(job.future.result(), alone.tokens[0])
