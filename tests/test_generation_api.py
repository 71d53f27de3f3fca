"""The library generation API (llada_jax/generation.py): batching never changes a row's answer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import generation
from llada_jax.config import default_config, model_config
from llada_jax.diffusion.sampler import generate
from llada_jax.model.transformer import Transformer
from llada_jax.train.checkpoint import save_params


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    config = default_config()
    config.model.init_std = 0.3   # spread-out logits: no near-ties between batch layouts
    config.sampler.gen_length, config.sampler.block_length, config.sampler.steps = 8, 4, 4
    model = Transformer(model_config(config))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"])
    directory = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_params(directory, config, params)
    return generation.Generator.load(directory), model, params


def test_bucketed_width_rounds_up_within_the_limit():
    assert generation.bucketed_width(5, 4, 100) == 8
    assert generation.bucketed_width(5, 4, 6) == 6
    assert generation.bucketed_width(9, 4, 6) == 9


def test_batched_rows_equal_lone_unpadded_calls(generator):
    gen, model, params = generator
    sampler = gen.sampler()
    prompts = [[1, 10, 20, 30, 40, 50], [1, 60], [1, 70, 80, 90]]  # ids < vocab 128
    out = gen.generate_ids(prompts, sampler, seed=0, prompt_bucket=4)
    assert out.tokens.shape == (3, sampler.gen_length)
    assert out.forward_passes > 0
    for i, prompt in enumerate(prompts):
        lone = generate(params, model, np.asarray([prompt], np.int32),
                        np.ones((1, len(prompt)), bool), sampler, jax.random.key(0))
        np.testing.assert_array_equal(out.tokens[i], np.asarray(lone)[0, len(prompt):])


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampled_rows_with_their_own_seeds_equal_lone_calls(generator, remasking):
    # Temperature 1 (Gumbel noise per position) and, with random remasking, uniform draws too:
    # with one seed per prompt, row i is what prompt i alone gets with seed i.
    gen, model, params = generator
    sampler = gen.sampler(temperature=1.0, remasking=remasking)
    prompts = [[1, 10, 20, 30, 40, 50], [1, 60], [1, 70, 80, 90], [1, 60]]
    seeds = [3, 4, 5, 6]
    out = gen.generate_ids(prompts, sampler, seed=seeds, prompt_bucket=4)
    for prompt, seed, row in zip(prompts, seeds, out.tokens, strict=True):
        lone = generate(params, model, np.asarray([prompt], np.int32),
                        np.ones((1, len(prompt)), bool), sampler, jax.random.key(seed))
        np.testing.assert_array_equal(row, np.asarray(lone)[0, len(prompt):])
    # The seeds matter: the same prompt with seeds 4 and 6 is sampled differently.
    assert not np.array_equal(out.tokens[1], out.tokens[3])
    with pytest.raises(ValueError, match=r"seed: expected one int or one per prompt \(4\)"):
        gen.generate_ids(prompts, sampler, seed=[1, 2])


def test_text_in_text_out_and_length_errors(generator):
    gen, _, _ = generator
    texts = gen.generate_text(["ab", "c"], gen.sampler(gen_length=4, block_length=4, steps=2))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="prompts: expected a list of prompts"):
        gen.generate_text("ab")
    with pytest.raises(ValueError, match=r"^prompt 0: the prompt has \d+ tokens"):
        gen.generate_text(["x" * 200])


def test_from_hf_round_trips_an_export(tmp_path):
    import dataclasses

    from llada_jax import config as config_lib
    from llada_jax import parallel
    from llada_jax.interop import hf
    from llada_jax.train import optimizer, state

    config = default_config()
    mesh = parallel.make_mesh(config)
    model = state.make_model(config)
    params = state.create_train_state(model, optimizer.make_optimizer(config.train), mesh,
                                      parallel.logical_rules(config), seed=3).params
    export = str(tmp_path / "export")
    hf.export_hf(params, config_lib.model_config(config), export, dtype="float32")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        generation.Generator.from_hf(export)
    with pytest.raises(FileNotFoundError, match="not found"):
        generation.Generator.from_hf(str(tmp_path / "missing"), tokenizer="char")
    loaded = generation.Generator.from_hf(export, tokenizer="char", dtype="bfloat16")
    assert loaded.config.model.d_model == config.model.d_model
    # The architecture and ids from config.json; bf16 compute as asked, float32 params as stored.
    assert loaded.model.config == dataclasses.replace(config_lib.model_config(config),
                                                      dtype="bfloat16")
    assert loaded.tokenizer.vocab_size <= loaded.config.model.vocab_size
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.params["wte"].sharding.spec == params["wte"].sharding.spec


def test_the_sampler_gets_left_padded_rows_and_one_key_per_seed(generator, monkeypatch):
    # What generate_ids hands the sampler, caught before any sampling: the prompts left-padded
    # to the bucket width, the rows filled up to the mesh's 8 batch rows by repeating the last
    # prompt, and row i's key equal to `jax.random.key(seed[i])` (padding rows: seed 0).
    gen, _, _ = generator

    class Handed(Exception):
        pass

    seen = {}

    def catch(params, model, tokens, mask, sampler, rng, **kwargs):
        seen.update(tokens=np.asarray(tokens), mask=np.asarray(mask), rng=rng)
        raise Handed

    monkeypatch.setattr(generation, "generate", catch)
    prompts = [[5, 6, 7], [8], [9, 9], [1], [2], [3, 4]]
    seeds = [0, 7, -3, 2**31 - 1, 2**31, 2**40 + 5]   # also past int32: key() reads int64
    with pytest.raises(Handed):
        gen.generate_ids(prompts, gen.sampler(), seed=seeds, prompt_bucket=4)
    p = gen.tokenizer.pad_id
    assert seen["tokens"].tolist() == [[p, 5, 6, 7], [p, p, p, 8], [p, p, 9, 9], [p, p, p, 1],
                                       [p, p, p, 2], [p, p, 3, 4], [p, p, 3, 4], [p, p, 3, 4]]
    assert seen["mask"].sum(1).tolist() == [3, 1, 2, 1, 1, 2, 2, 2]
    assert not seen["mask"][:, 0].any() and seen["mask"][:, -1].all()   # padding on the left
    lone_keys = [jax.random.key_data(jax.random.key(s)) for s in [*seeds, 0, 0]]
    np.testing.assert_array_equal(jax.random.key_data(seen["rng"]), np.stack(lone_keys))
    with pytest.raises(ValueError, match=r"batch_size: expected a multiple of the mesh's batch "
                                         r"axes \(8 rows\) holding 6 prompts, found 4"):
        gen.generate_ids(prompts, gen.sampler(), batch_size=4)
    with pytest.raises(ValueError, match="expected at least one prompt"):
        gen.generate_ids([], gen.sampler())
