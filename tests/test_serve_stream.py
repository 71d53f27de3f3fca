"""The sampler's streaming hook: every finished block reaches the host, and nothing else changes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import parallel
from llada_jax.config import default_config, model_config
from llada_jax.diffusion import sampler as sampler_lib
from llada_jax.model.transformer import Transformer


def _tiny_model():
    config = default_config()
    config.model.init_std = 0.3
    model = Transformer(model_config(config))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"])
    return config, model, params


def test_streamed_blocks_are_the_final_tokens_and_one_program_serves_every_tag():
    config, model, params = _tiny_model()
    sampler = sampler_lib.SamplerConfig.from_config(config, gen_length=12, block_length=4,
                                                    steps=6)
    tokens, mask = sampler_lib.pad_prompts([[1, 10, 20], [1, 30, 40, 50, 60]], pad_id=2)
    plain = np.asarray(sampler_lib.generate(params, model, tokens, mask, sampler,
                                            jax.random.key(1)))
    received = []

    def stream(tag, block, block_tokens):
        received.append((int(tag), int(block), np.asarray(block_tokens)))

    before = sampler_lib._generate_jit._cache_size()
    for tag in (7, 8):
        out = np.asarray(sampler_lib.generate(params, model, tokens, mask, sampler,
                                              jax.random.key(1), stream=stream, stream_tag=tag))
        np.testing.assert_array_equal(out, plain)   # the hook changes nothing
    # One more compiled program (the streaming one) for both tags.
    assert sampler_lib._generate_jit._cache_size() == before + 1
    assert [(t, b) for t, b, _ in sorted(received, key=lambda r: r[:2])] == [
        (7, 0), (7, 1), (7, 2), (8, 0), (8, 1), (8, 2)]
    width = tokens.shape[1]
    for _, block, block_tokens in received:
        start = width + 4 * block
        np.testing.assert_array_equal(block_tokens, plain[:, start:start + 4])


def test_stream_hook_with_the_batch_sharded_over_two_devices():
    config, model, params = _tiny_model()
    config.mesh.data, config.mesh.fsdp = 1, 2
    mesh = parallel.make_mesh(config, jax.devices()[:2])
    sampler = sampler_lib.SamplerConfig.from_config(config, gen_length=8, block_length=4,
                                                    steps=4)
    tokens, mask = sampler_lib.pad_prompts([[1, 10, 20], [1, 30]], pad_id=2)
    received = {}

    def stream(tag, block, block_tokens):
        received[int(block)] = np.asarray(block_tokens)

    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.logical_rules(config)):
        batch = parallel.global_batch({"tokens": tokens, "mask": mask}, mesh)
        out = np.asarray(sampler_lib.generate(params, model, batch["tokens"], batch["mask"],
                                              sampler, jax.random.key(0), stream=stream))
    assert sorted(received) == [0, 1]
    for block, block_tokens in received.items():
        assert block_tokens.shape == (2, 4)
        start = tokens.shape[1] + 4 * block
        np.testing.assert_array_equal(block_tokens, out[:, start:start + 4])
