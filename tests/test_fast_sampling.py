"""Fast sampling: KV caches, threshold / factor parallel decoding and early exit.

Expected values come from the vanilla sampler (itself checked against the NumPy reference in
test_sampler.py), from exactness arguments stated in each test, or from hand-computed schedules.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import parallel
from llada_jax.config import ModelConfig, default_config
from llada_jax.diffusion.sampler import (
    SamplerConfig,
    build_canvas,
    factor_count,
    generate,
    pad_prompts,
    sample,
)
from llada_jax.model.transformer import Transformer
from tests.test_sampler import EOS, MASK, MODEL_CONFIG, PAD, sampler_config, tiny

PROMPT = np.random.default_rng(21).integers(7, 48, size=(2, 5))


def run(config: SamplerConfig, n_layers: int = 2, prompt=PROMPT, key=0):
    model, params = tiny(n_layers)
    return generate(params, model, prompt, np.ones_like(prompt, bool), config,
                    jax.random.key(key), return_stats=True)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_vanilla(cache):
    vanilla = sampler_config(block_length=8, steps=8)
    out = run(dataclasses.replace(vanilla, cache=cache, refresh_every=1))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(run(vanilla).tokens))
    assert int(out.computed_positions) == 8 * (5 + 16)   # every pass was a full pass


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_first_step_of_every_block_equals_vanilla(cache):
    """One step per block: every step is a block's first, whose logits come from a full pass."""
    vanilla = sampler_config(block_length=8, steps=2)
    out = run(dataclasses.replace(vanilla, cache=cache))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(run(vanilla).tokens))


@functools.cache
def last_layer_mixing(n_layers: int):
    """The tiny model with the attention output of every layer but the last set to zero: those
    layers act on each position alone, so every layer's keys/values at a position depend only on
    that position's token, while the cached path still runs through `n_layers` layers."""
    model, params = tiny(n_layers)
    kernel = params["blocks"]["attn"]["attn_out"]["kernel"]
    params = jax.tree.map(lambda a: a, params)
    params["blocks"]["attn"]["attn_out"]["kernel"] = kernel.at[:-1].set(0.0)
    return model, params


@pytest.mark.parametrize("cache,n_layers,cfg", [("prefix", 1, 1.0), ("dual", 1, 1.0),
                                                ("prefix", 3, 0.0), ("dual", 3, 1.0)])
def test_caches_are_exact_when_keys_depend_on_own_tokens(cache, n_layers, cfg):
    """When cached keys/values depend only on each position's own token (one layer, or several
    whose only mixing layer is the last), and the positions a window does not recompute keep
    their tokens within a block (the prefix, and for dual also the masked suffix), the cached
    passes are exact: every step matches vanilla, through the multi-layer cached path too."""
    model, params = tiny(n_layers) if n_layers == 1 else last_layer_mixing(n_layers)
    vanilla = sampler_config(block_length=8, steps=16, cfg_scale=cfg)
    mask = np.ones_like(PROMPT, bool)
    out = generate(params, model, PROMPT, mask, dataclasses.replace(vanilla, cache=cache),
                   jax.random.key(0), return_stats=True)
    expected = generate(params, model, PROMPT, mask, vanilla, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected))
    # Per block one full pass (21 positions), then 7 passes over the window only: from the block
    # to the end (prefix: 16, then 8), or the block alone (dual: 8).
    windows = [16, 8] if cache == "prefix" else [8, 8]
    assert int(out.computed_positions) == sum(21 + 7 * w for w in windows)


def test_threshold_above_every_confidence_is_one_token_per_step():
    for cache in ("none", "dual"):
        vanilla = sampler_config(block_length=8, steps=16, cache=cache)
        out = run(dataclasses.replace(vanilla, threshold=1.0))
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(run(vanilla).tokens))
        assert int(out.num_forward_passes) == 16
        np.testing.assert_array_equal(np.sort(np.asarray(out.commit_pass), axis=1),
                                      np.tile(np.arange(16), (2, 1)))


@pytest.mark.parametrize("rule", [dict(threshold=0.1), dict(factor=4.0)])
def test_low_threshold_uses_fewer_passes(rule):
    out = run(sampler_config(block_length=8, steps=16, **rule))
    tokens = np.asarray(out.tokens)
    assert not np.any(tokens == MASK)
    assert int(out.num_forward_passes) < 16
    # Several tokens were committed by one pass.
    passes = np.asarray(out.commit_pass)
    assert max(np.bincount(row).max() for row in passes) > 1


# A crafted model whose confidences are fixed per position (they ignore the tokens), so the
# commits of every step can be derived by hand from the rules.
CONFIDENCES = [0.95, 0.3, 0.92, 0.5, 0.99, 0.2, 0.4, 0.1]
GEN_START = 3


def crafted_forward(tokens, *, attention_mask, positions, return_kv=False, **unused):
    del tokens, attention_mask, unused
    vocab = MODEL_CONFIG.vocab_size
    table = np.zeros((GEN_START + 16, vocab), np.float32)
    for q in range(16):
        p = CONFIDENCES[q % 8]
        row = np.full(vocab, np.log((1 - p) / (vocab - 2)))
        row[MASK] = -np.inf          # the sampler excludes MASK; keep the probabilities exact
        row[10 + q] = np.log(p)
        table[GEN_START + q] = row
    logits = jnp.asarray(table)[positions]
    return (logits, None) if return_kv else logits


@pytest.mark.parametrize("rule,expected", [
    # threshold 0.9: {0.95, 0.92, 0.99} together, then one at a time by confidence.
    (dict(threshold=0.9), [0, 3, 0, 1, 0, 4, 2, 5]),
    # factor 2: k-th best must be >= 1 - 2/(k+1) = (always), 1/3, 1/2, 3/5, ...:
    # [.99 .95 .92 | .5] -> 3; [.5 .4 | .3] -> 2; [.3 | .2] -> 1; [.2 | .1]: only the LAST one
    # fails, so Fast-dLLM commits both -> 2 (4 passes per block, not 5).
    (dict(factor=2.0), [0, 2, 0, 1, 0, 3, 1, 3]),
])
def test_parallel_rules_hand_schedule(rule, expected):
    prompt = np.full((1, GEN_START), 9)
    tokens, mask, positions = build_canvas(prompt, np.ones_like(prompt, bool), 16, MASK)
    config = sampler_config(block_length=8, **rule)
    out = jax.jit(lambda key: sample(crafted_forward, tokens, mask, positions, GEN_START,
                                     config, key))(jax.random.key(0))
    per_block = max(expected) + 1
    np.testing.assert_array_equal(np.asarray(out.commit_pass)[0],
                                  expected + [per_block + e for e in expected])
    assert int(out.num_forward_passes) == 2 * per_block
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, GEN_START:], 10 + np.arange(16))


MODES = [dict(cache="prefix", factor=3.0), dict(cache="dual", threshold=0.2, early_exit=True)]


@pytest.mark.parametrize("mode", MODES)
def test_row_alone_equals_row_in_batch(mode):
    model, params = tiny()
    rng = np.random.default_rng(8)
    prompts = [list(rng.integers(7, 48, size=n)) for n in (3, 6)]
    config = sampler_config(block_length=8, **mode)
    tokens, mask = pad_prompts(prompts, PAD)
    batched = np.asarray(generate(params, model, tokens, mask, config, jax.random.key(0)))
    width = tokens.shape[1]
    for row, prompt in enumerate(prompts):
        alone = np.asarray(generate(params, model, np.asarray([prompt]),
                                    np.ones((1, len(prompt)), bool), config, jax.random.key(0)))
        np.testing.assert_array_equal(batched[row, width:], alone[0, len(prompt):])


def eos_filled(tokens, gen_start):
    """Independent numpy version: everything after a row's first EOS becomes EOS."""
    out = np.asarray(tokens).copy()
    for row in out:
        hits = np.flatnonzero(row[gen_start:] == EOS)
        if hits.size:
            row[gen_start + hits[0]:] = EOS
    return out


@functools.cache
def eos_biased_run(config: SamplerConfig):
    """The tiny model with +6 on the EOS logit from the 7th generated position on: rows finish
    in the second or third of four blocks."""
    model, params = tiny()
    tokens, mask, positions = build_canvas(PROMPT, np.ones_like(PROMPT, bool), 16, MASK)
    onehot = jnp.zeros(MODEL_CONFIG.vocab_size).at[EOS].set(1.0)

    def forward(x, **kw):
        out = model.apply({"params": params}, x, **kw)
        bias = 6.0 * (kw["positions"] >= 5 + 6)[..., None] * onehot
        return (out[0] + bias, out[1]) if kw.get("return_kv") else out + bias

    return jax.jit(lambda key: sample(forward, tokens, mask, positions, 5, config, key))


@pytest.mark.parametrize("mode", [dict(), dict(cache="dual", threshold=0.3),
                                  dict(temperature=1.0)])
def test_early_exit_changes_only_the_pass_count(mode):
    config = sampler_config(block_length=4, steps=16, **mode)
    full = eos_biased_run(config)(jax.random.key(4))
    early = eos_biased_run(dataclasses.replace(config, early_exit=True))(jax.random.key(4))
    full_tokens = np.asarray(full.tokens)
    assert np.all(np.any(full_tokens[:, 5:] == EOS, axis=1))      # every row finishes
    np.testing.assert_array_equal(np.asarray(early.tokens), eos_filled(full_tokens, 5))
    assert int(early.num_forward_passes) < int(full.num_forward_passes)


def test_sharded_fast_modes_match_single_device():
    model, params = tiny()
    config = default_config()
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh = parallel.make_mesh(config)
    rules = parallel.logical_rules(config)
    prompt = np.random.default_rng(9).integers(7, 48, size=(8, 5))
    mask = np.ones_like(prompt, bool)
    sconfig = sampler_config(block_length=8, cfg_scale=1.0, cache="dual", threshold=0.2,
                             early_exit=True)
    expected = generate(params, model, prompt, mask, sconfig, jax.random.key(0),
                        return_stats=True)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((8, 4), jnp.int32)))
    shardings = parallel.logical_to_sharding(boxed["params"], mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = parallel.global_batch({"tokens": prompt, "mask": mask}, mesh)
        out = generate(jax.device_put(params, shardings), model, batch["tokens"], batch["mask"],
                       sconfig, jax.random.key(0), return_stats=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert int(out.num_forward_passes) == int(expected.num_forward_passes)


def test_parallel_decoding_ignores_steps():
    # steps=3 does not divide into 4 blocks, but threshold decoding does not use it.
    config = sampler_config(block_length=4, steps=3, threshold=0.5)
    assert config.max_steps_per_block == 4


def test_llada_8b_shapes_trace():
    """Shape-only: every mode traces with the real 8B architecture (nothing is allocated)."""
    config = dataclasses.replace(ModelConfig(), dtype="bfloat16", param_dtype="bfloat16")
    model = Transformer(config)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    prompt = np.full((2, 64), 500, np.int32)
    tokens, mask, positions = build_canvas(prompt, np.ones_like(prompt, bool), 128, 126336)
    for mode in (dict(), dict(cache="prefix", cfg_scale=1.0), dict(cache="dual", threshold=0.9)):
        sconfig = SamplerConfig(gen_length=128, block_length=32, steps=128, **mode)
        out = jax.eval_shape(lambda p, s=sconfig: sample(
            functools.partial(model.apply, {"params": p}), tokens, mask, positions, 64, s,
            jax.random.key(0)), params)
        assert out.tokens.shape == (2, 192) and out.commit_pass.shape == (2, 128)


def fast_dllm_factor_count(confidences, factor):
    """Fast-dLLM's `get_transfer_index_dynamic` count for one row's eligible confidences,
    restated: thresholds 1 - factor / (n + 1) for n = 1.., the first forced to pass; stop at
    the first failure; one more when stopped at the first or at the last."""
    n = len(confidences)
    thresholds = [1 - factor / (k + 1) for k in range(1, n + 1)]
    thresholds[0] = -1
    ranked = sorted(confidences, reverse=True)
    top = 0
    for top in range(n):
        if ranked[top] < thresholds[top]:
            break
    if top == 0 or top == n - 1:
        top += 1
    return top


def test_factor_count_matches_fast_dllm_on_random_rows():
    rng = np.random.default_rng(0)
    width = 8
    confidence = rng.uniform(0.0, 1.0, size=(400, width)) ** rng.uniform(0.05, 2, (400, 1))
    eligible = rng.uniform(size=(400, width)) < rng.uniform(0.1, 1.0, (400, 1))
    eligible[:, 0] |= ~eligible.any(axis=1)                 # Fast-dLLM has at least one mask
    for factor in (0.5, 1.0, 2.0, 4.0):
        found = np.asarray(factor_count(jnp.asarray(confidence, jnp.float32),
                                        jnp.asarray(eligible), factor))
        expected = [fast_dllm_factor_count(list(c[e]), factor)
                    for c, e in zip(confidence.astype(np.float32), eligible, strict=True)]
        np.testing.assert_array_equal(found, expected)
