"""The jitted reverse process against a step-by-step NumPy restatement of the OFFICIAL LLaDA
`generate` (ML-GSAI/LLaDA generate.py), hand-worked commit orders, and distribution tests of
the temperature draw against the exact softmax.

The model is a tiny random Transformer with a large init scale, so logits are spread out and
confidence ties (and argmax ties) are improbable; both implementations break remaining ties
toward the lower position.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import parallel
from llada_jax.config import ModelConfig, default_config, validate
from llada_jax.diffusion.sampler import (
    SamplerConfig,
    build_canvas,
    candidate_confidence,
    draw_candidates,
    generate,
    gumbel_from_bits,
    gumbel_noise,
    num_transfer_tokens,
    pad_prompts,
    sample,
)
from llada_jax.model.transformer import Transformer

MASK, EOS, BOS, PAD, EOT = 3, 2, 1, 0, 6
MODEL_CONFIG = ModelConfig(
    vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
    mlp_hidden_size=64, rope_theta=10000.0, max_sequence_length=64, mask_token_id=MASK,
    eos_token_id=EOS, bos_token_id=BOS, pad_token_id=PAD, init_std=0.3)


@functools.cache
def tiny(n_layers: int = 2):
    config = dataclasses.replace(MODEL_CONFIG, n_layers=n_layers)
    model = Transformer(config)
    params = nn.meta.unbox(model.init(jax.random.key(7), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params


def sampler_config(**kw) -> SamplerConfig:
    base = {"gen_length": 16, "block_length": 16, "steps": 16, "mask_id": MASK, "eos_id": EOS,
            "eot_id": EOT}
    base.update(kw)
    return SamplerConfig(**base)


def official_generate(logits_fn, prompt, attention_mask, gen_length, block_length, steps,
                      cfg_scale=0.0, logits_eos_inf=False, confidence_eos_eot_inf=False):
    """The official LLaDA `generate` (generate.py of ML-GSAI/LLaDA) at temperature 0, step by step.

    Restated from the official algorithm, not from this project: x0 = argmax of the (guided)
    logits; with `confidence_eos_eot_inf` the EOS and EoT logits become -inf AFTER x0 is drawn and
    BEFORE the float64 softmax that gives the confidence (at T = 0 the official code aliases the
    noisy and the plain logits, so both ids are hit); positions after the block and decided
    positions get -inf; per row the k most confident are committed (`torch.topk`; ties, which the
    spread-out test model makes improbable, go to the lower position). The mask id may be a
    candidate here, as in the official code. logits_fn(x, attention_mask) -> float64 logits.
    """
    batch, prompt_len = prompt.shape
    x = np.concatenate([prompt, np.full((batch, gen_length), MASK)], axis=1)
    attention_mask = np.concatenate([attention_mask, np.ones((batch, gen_length), bool)], axis=1)
    prompt_index = x != MASK
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        start = prompt_len + block * block_length
        end = start + block_length
        masks_in_block = (x[:, start:end] == MASK).sum(axis=1)
        for step in range(steps_per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                unconditional = x.copy()
                unconditional[prompt_index] = MASK
                both = logits_fn(np.concatenate([x, unconditional]),
                                 np.concatenate([attention_mask, attention_mask]))
                cond, uncond = both[:batch], both[batch:]
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = logits_fn(x, attention_mask)
            if logits_eos_inf:
                logits[:, :, EOS] = -np.inf
            x0 = logits.argmax(-1)
            if confidence_eos_eot_inf:
                logits[:, :, EOS] = logits[:, :, EOT] = -np.inf
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            confidence = np.take_along_axis(probs, x0[..., None], -1)[..., 0]
            confidence[:, end:] = -np.inf
            confidence = np.where(mask_index, confidence, -np.inf)
            for row in range(batch):
                m = masks_in_block[row]
                k = m // steps_per_block + (1 if step < m % steps_per_block else 0)
                order = np.argsort(-confidence[row], kind="stable")
                for position in order[:k]:
                    x[row, position] = x0[row, position]
    return x


# The model the reference comparisons use: the tiny Transformer with the mask id's logit at -1e9,
# like a trained LLaDA (which gives it ~0 probability). An untrained model often predicts MASK,
# which the official code would commit (leaving the position masked) and this project never
# does: a known, documented difference that would hide the algorithm being compared.
def no_mask_head(model, params):
    def head(hidden):
        logits = model.apply({"params": params}, hidden, method=Transformer.logits_from_hidden)
        return logits.at[..., MASK].set(-1e9)    # finite: CFG differences stay finite
    return head


@functools.cache
def official_logits_fn(n_layers: int = 2):
    """The model alone (jitted) as the official code calls it: tokens and key mask, positions
    0..L-1 (RoPE is relative, so a left-padded row's constant shift changes nothing)."""
    model, params = tiny(n_layers)

    def logits(x, m):
        hidden = model.apply({"params": params}, x, attention_mask=m, return_hidden=True)
        return no_mask_head(model, params)(hidden)
    fn = jax.jit(logits)
    return lambda x, m: np.asarray(fn(jnp.asarray(x, jnp.int32), jnp.asarray(m, bool)),
                                   np.float64)


def project_generate(prompt, prompt_mask, config):
    """This project's sampler on the same model (hidden states, then the head on the block)."""
    model, params = tiny()
    tokens, mask, positions = build_canvas(prompt, prompt_mask, config.gen_length, MASK)
    forward = functools.partial(model.apply, {"params": params})
    run = jax.jit(lambda key: sample(forward, tokens, mask, positions, prompt.shape[1], config,
                                     key, head=no_mask_head(model, params)).tokens)
    return np.asarray(run(jax.random.key(0)))


GRID = [  # (block_length, steps, cfg_scale, eos rules): 1, 2 and 4 blocks of a 16-token answer
    (16, 16, 0.0, {}), (16, 6, 1.5, {}), (8, 8, 0.0, {"confidence_eos_eot_inf": True}),
    (8, 4, 1.5, {}), (4, 16, 1.5, {}),
    (4, 8, 0.0, {"logits_eos_inf": True, "confidence_eos_eot_inf": True})]


@pytest.mark.parametrize("block_length,steps,cfg_scale,rules", GRID)
def test_matches_official_reference(block_length, steps, cfg_scale, rules):
    prompt = np.random.default_rng(block_length + steps).integers(7, 48, size=(2, 5))
    mask = np.ones_like(prompt, bool)
    config = sampler_config(block_length=block_length, steps=steps, cfg_scale=cfg_scale, **rules)
    expected = official_generate(official_logits_fn(), prompt, mask, 16, block_length, steps,
                                 cfg_scale, **rules)
    np.testing.assert_array_equal(project_generate(prompt, mask, config), expected)
    assert not np.any(expected == MASK)


def test_left_padded_batch_matches_official_reference():
    rng = np.random.default_rng(11)
    tokens, mask = pad_prompts([list(rng.integers(7, 48, size=n)) for n in (2, 6, 4)], PAD)
    config = sampler_config(block_length=8, steps=8, cfg_scale=1.0)
    expected = official_generate(official_logits_fn(), tokens, mask, 16, 8, 8, 1.0)
    np.testing.assert_array_equal(project_generate(tokens, mask, config), expected)


def test_generate_equals_sample_with_the_model_head():
    """`generate` builds `sample` with the model's own head; the sampler itself sets the mask
    id's logit to -inf, so it must equal the runs above on the no-MASK head token for token."""
    model, params = tiny()
    prompt = np.random.default_rng(2).integers(7, 48, size=(2, 5))
    mask = np.ones_like(prompt, bool)
    config = sampler_config(block_length=8, steps=8, cfg_scale=1.0)
    out = np.asarray(generate(params, model, prompt, mask, config, jax.random.key(0)))
    np.testing.assert_array_equal(out, project_generate(prompt, mask, config))


def test_num_transfer_tokens_formula():
    for steps in (1, 2, 3, 5, 8, 16):
        masks = np.arange(0, 40)
        counts = np.asarray(num_transfer_tokens(jnp.asarray(masks), steps))
        for m, row in zip(masks, counts, strict=True):
            # REFERENCE.md step 2: m // steps each, one more in the first m % steps steps.
            expected = [m // steps + (1 if i < m % steps else 0) for i in range(steps)]
            np.testing.assert_array_equal(row, expected)
            assert row.sum() == m


def test_num_transfer_tokens_hand_cases():
    np.testing.assert_array_equal(num_transfer_tokens(jnp.asarray([10, 3]), 4),
                                  [[3, 3, 2, 2], [1, 1, 1, 0]])


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_schedule_in_the_sampler(remasking):
    """Rows with different mask counts per block commit exactly the scheduled count per step."""
    model, params = tiny()
    gen, block, steps = 16, 8, 6
    spb = steps // (gen // block)
    config = sampler_config(block_length=block, steps=steps, remasking=remasking,
                            temperature=1.0 if remasking == "random" else 0.0)
    prompt = np.random.default_rng(3).integers(7, 48, size=(3, 4))
    tokens, attention_mask, positions = build_canvas(prompt, np.ones_like(prompt, bool), gen,
                                                     MASK)
    tokens = np.asarray(tokens).copy()
    # Pre-filled generation tokens (infilling): 8, 5, 3 masks in block 0 and 6, 6, 4 in block 1.
    prefilled = {0: [12, 13], 1: [4, 5, 6, 9, 10], 2: [0, 2, 4, 6, 7, 12, 13, 14, 15]}
    for row, columns in prefilled.items():
        tokens[row, 4 + np.asarray(columns)] = 40
    run = jax.jit(lambda t, key: sample(
        lambda x, **kw: model.apply({"params": params}, x, **kw), t, attention_mask, positions,
        4, config, key))
    out = run(jnp.asarray(tokens), jax.random.key(1))
    final, commit_pass = np.asarray(out.tokens), np.asarray(out.commit_pass)
    assert not np.any(final == MASK)
    for row, columns in prefilled.items():
        np.testing.assert_array_equal(final[row, 4 + np.asarray(columns)], 40)
        assert np.all(commit_pass[row, columns] == -1)
    for row in range(3):
        for b in range(2):
            cols = slice(b * block, (b + 1) * block)
            masks = int((tokens[row, 4:][cols] == MASK).sum())
            expected = [masks // spb + (1 if i < masks % spb else 0) for i in range(spb)]
            passes = commit_pass[row, cols]
            found = [int((passes == b * spb + i).sum()) for i in range(spb)]
            assert found == expected, (row, b)
            # Nothing of a block is committed before its turn or after it.
            committed = passes[passes >= 0]
            assert committed.min() >= b * spb and committed.max() < (b + 1) * spb
    assert int(out.num_forward_passes) == steps


def test_batch_invariance_left_padding():
    """Each row of a left-padded mixed-length batch equals that prompt sampled alone."""
    model, params = tiny()
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(7, 48, size=n)) for n in (3, 7)]
    config = sampler_config(block_length=8, steps=8, cfg_scale=1.0)
    tokens, mask = pad_prompts(prompts, PAD)
    batched = np.asarray(generate(params, model, tokens, mask, config, jax.random.key(0)))
    width = tokens.shape[1]
    for row, prompt in enumerate(prompts):
        alone = np.asarray(generate(params, model, np.asarray([prompt]),
                                    np.ones((1, len(prompt)), bool), config, jax.random.key(0)))
        np.testing.assert_array_equal(batched[row, width:], alone[0, len(prompt):])
        np.testing.assert_array_equal(batched[row, width - len(prompt):width], prompt)


def test_temperature_reproducible_and_key_dependent():
    model, params = tiny()
    prompt = np.random.default_rng(2).integers(7, 48, size=(2, 5))
    mask = np.ones_like(prompt, bool)
    config = sampler_config(block_length=8, steps=8, temperature=1.0)
    a = np.asarray(generate(params, model, prompt, mask, config, jax.random.key(11)))
    b = np.asarray(generate(params, model, prompt, mask, config, jax.random.key(11)))
    c = np.asarray(generate(params, model, prompt, mask, config, jax.random.key(12)))
    np.testing.assert_array_equal(a, b)
    assert np.mean(a[:, 5:] != c[:, 5:]) > 0.3
    assert not np.any(a == MASK)
    # Greedy decoding from the same model differs from the samples (the noise matters).
    greedy = np.asarray(generate(params, model, prompt, mask,
                                 dataclasses.replace(config, temperature=0.0),
                                 jax.random.key(11)))
    assert np.mean(a[:, 5:] != greedy[:, 5:]) > 0.3


# A crafted "model": at even generated positions EOS (or EoT) is the confident favourite, at odd
# positions token 20 is a less confident favourite and EOS/EoT are impossible.
GEN_START, GEN = 4, 8


def crafted_forward(tokens, *, attention_mask, positions, **unused):
    del tokens, attention_mask, unused
    vocab = MODEL_CONFIG.vocab_size
    table = np.zeros((GEN_START + GEN, vocab), np.float32)
    for q in range(GEN):
        row = table[GEN_START + q]
        if q % 2 == 0:
            row[EOS if q % 4 == 0 else EOT] = 12.0
        else:
            row[20] = 4.0
            row[EOS] = row[EOT] = -30.0
    return jnp.asarray(table)[positions]


@functools.cache
def crafted_run(config: SamplerConfig):
    prompt = np.full((2, GEN_START), 9)
    tokens, attention_mask, positions = build_canvas(prompt, np.ones_like(prompt, bool), GEN,
                                                     MASK)
    return jax.jit(lambda key: sample(crafted_forward, tokens, attention_mask, positions,
                                      GEN_START, config, key))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_eos_inf_forbids_eos(temperature):
    base = sampler_config(gen_length=GEN, block_length=GEN, steps=GEN, temperature=temperature)
    without = np.asarray(crafted_run(base)(jax.random.key(0)).tokens)[:, GEN_START:]
    assert np.sum(without == EOS) >= 2 * (GEN // 4)   # the bias works
    banned = crafted_run(dataclasses.replace(base, logits_eos_inf=True))
    out = np.asarray(banned(jax.random.key(0)).tokens)[:, GEN_START:]
    assert not np.any(out == EOS) and not np.any(out == MASK)


def test_vocab_limit_keeps_candidates_in_the_tokenizer():
    base = sampler_config(gen_length=GEN, block_length=GEN, steps=GEN, temperature=1.0)
    assert np.any(np.asarray(crafted_run(base)(jax.random.key(0)).tokens) == 20)
    limited = crafted_run(dataclasses.replace(base, vocab_limit=16))(jax.random.key(0))
    assert np.all(np.asarray(limited.tokens)[:, GEN_START:] < 16)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_confidence_eos_eot_inf_commits_them_last(temperature):
    base = sampler_config(gen_length=GEN, block_length=GEN, steps=GEN, temperature=temperature)
    plain = crafted_run(base)(jax.random.key(3))
    late = crafted_run(dataclasses.replace(base, confidence_eos_eot_inf=True))(jax.random.key(3))
    for out, eos_first in ((plain, True), (late, False)):
        tokens = np.asarray(out.tokens)[:, GEN_START:]
        passes = np.asarray(out.commit_pass)
        special = (tokens == EOS) | (tokens == EOT)
        assert special.sum() >= 2 * (GEN // 2) - 1   # the confident favourites were drawn
        for row in range(2):
            first_special = passes[row][special[row]].min()
            last_special = passes[row][special[row]].max()
            first_other = passes[row][~special[row]].min()
            last_other = passes[row][~special[row]].max()
            if eos_first:   # without the option EOS/EoT (more confident) come first
                assert last_special < first_other
            else:           # with it, every other token is committed before any EOS/EoT
                assert last_other < first_special


def test_sharded_batch_matches_single_device():
    model, params = tiny()
    config = default_config()
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh = parallel.make_mesh(config)
    rules = parallel.logical_rules(config)
    prompt = np.random.default_rng(9).integers(7, 48, size=(8, 5))
    mask = np.ones_like(prompt, bool)
    sconfig = sampler_config(block_length=8, steps=8, cfg_scale=1.0)
    expected = np.asarray(generate(params, model, prompt, mask, sconfig, jax.random.key(0)))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((8, 4), jnp.int32)))
    shardings = parallel.logical_to_sharding(boxed["params"], mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded_params = jax.device_put(params, shardings)
        batch = parallel.global_batch({"tokens": prompt, "mask": mask}, mesh)
        out = generate(sharded_params, model, batch["tokens"], batch["mask"], sconfig,
                       jax.random.key(0))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_config_section_builds_sampler_config():
    config = default_config()
    config.sampler.gen_length, config.sampler.block_length, config.sampler.steps = 64, 16, 32
    config.sampler.cfg_scale = 0.5
    validate(config)
    s = SamplerConfig.from_config(config, eot_id=6)
    assert (s.gen_length, s.block_length, s.steps, s.cfg_scale) == (64, 16, 32, 0.5)
    assert (s.mask_id, s.eos_id, s.eot_id) == (config.model.mask_token_id,
                                                config.model.eos_token_id, 6)
    assert s.num_blocks == 4 and s.max_steps_per_block == 8


@pytest.mark.parametrize("fields,message", [
    ({"gen_length": 16, "block_length": 5}, "sampler.block_length"),
    ({"gen_length": 16, "block_length": 4, "steps": 6}, "sampler.steps"),
    ({"gen_length": 16, "block_length": 16, "steps": 32}, "at most sampler.gen_length=16"),
    ({"remasking": "best"}, "sampler.remasking"),
    ({"temperature": -1.0}, "sampler.temperature"),
    # Fast-sampling settings that contradict each other or are out of range.
    ({"threshold": 0.9, "factor": 1.0}, "sampler.factor"),
    ({"threshold": 0.9, "remasking": "random"}, "sampler.remasking"),
    ({"refresh_every": 2}, "sampler.refresh_every"),
    ({"early_exit": True, "logits_eos_inf": True}, "sampler.early_exit"),
    ({"threshold": 1.5}, "sampler.threshold"),
    ({"factor": -1.0}, "sampler.factor"),
    ({"cache": "full"}, "sampler.cache"),
])
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        sampler_config(**fields)
    config = default_config()
    config.sampler.update(fields)
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_prompt_errors():
    model, params = tiny()
    config = sampler_config()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length=64"):
        generate(params, model, np.ones((1, 60), np.int32), np.ones((1, 60), bool), config, key)
    with pytest.raises(ValueError, match="pad id must differ from the mask id"):
        tokens, mask = pad_prompts([[5, 6, 7], [8]], MASK)
        generate(params, model, tokens, mask, config, key)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are empty"):
        generate(params, model, np.full((2, 3), 9), np.asarray([[1, 1, 1], [0, 0, 0]], bool),
                 config, key)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts([[5], []], PAD)
    with pytest.raises(ValueError, match="not left-padded"):
        generate(params, model, np.full((1, 3), 9), np.asarray([[1, 1, 0]], bool), config, key)


def two_position_forward(table):
    """A crafted model: fixed probability rows (one per generated position) after a 2-token
    prompt; rows are given as {token: probability} with the rest spread evenly."""
    vocab = MODEL_CONFIG.vocab_size
    logits = np.full((2 + len(table), vocab), -np.inf, np.float32)
    for q, probs in enumerate(table):
        rest = [t for t in range(vocab) if t not in probs and t != MASK]
        left = 1.0 - sum(probs.values())
        row = np.full(vocab, np.log(left / len(rest)), np.float32)
        row[MASK] = -np.inf
        for token, p in probs.items():
            row[token] = np.log(p)
        logits[2 + q] = row

    def forward(tokens, *, positions, **unused):
        return jnp.asarray(logits)[positions]
    return forward


def test_confidence_eos_eot_inf_renormalises_before_the_softmax():
    """The issue's worked case at T = 0. Position A: p(x)=0.45, p(EOS)=0.40; position B:
    p(y)=0.60. With EOS at -inf before the softmax, A's candidate x has confidence
    0.45 / 0.60 = 0.75 > 0.60, so A is committed first (one token per step); the raw
    probabilities (0.45 < 0.60) put B first. (At T > 0 the same confidence function is used:
    `test_candidate_confidence_by_hand`.)"""
    x_id, y_id = 20, 30
    forward = two_position_forward([{x_id: 0.45, EOS: 0.40}, {y_id: 0.60}])
    prompt = np.full((1, 2), 9)
    tokens, mask, positions = build_canvas(prompt, np.ones_like(prompt, bool), 2, MASK)
    base = sampler_config(gen_length=2, block_length=2, steps=2)
    for rule, order in ((True, [0, 1]), (False, [1, 0])):
        config = dataclasses.replace(base, confidence_eos_eot_inf=rule)
        out = jax.jit(lambda key, c=config: sample(forward, tokens, mask, positions, 2, c, key))(
            jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out.tokens)[0, 2:], [x_id, y_id])
        np.testing.assert_array_equal(np.asarray(out.commit_pass)[0], order)


def test_candidate_confidence_by_hand():
    """EOS/EoT rule at any temperature: EOS/EoT candidates get 0, others p / (1 - pEOS - pEoT)."""
    probs = np.full(MODEL_CONFIG.vocab_size, 0.0, np.float64)
    probs[[10, EOS, EOT, 11]] = [0.3, 0.4, 0.1, 0.2]
    logits = jnp.asarray(np.log(np.where(probs > 0, probs, 1e-30)), jnp.float32)[None]
    logits = jnp.repeat(logits, 3, axis=0)
    candidates = jnp.asarray([10, EOS, 11])
    key = jax.random.key(0)
    plain = candidate_confidence(logits, candidates, sampler_config(temperature=1.0), key)
    ruled = candidate_confidence(logits, candidates,
                                 sampler_config(temperature=1.0, confidence_eos_eot_inf=True), key)
    np.testing.assert_allclose(np.asarray(plain), [0.3, 0.4, 0.2], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ruled), [0.6, 0.0, 0.4], rtol=1e-5)


def gumbel_reference(hi: int, lo: int) -> float:
    """-log(-log(1 - v)) in float64 for v = (hi 2^32 + lo + 1/2) / 2^64, through the smaller of v
    and 1 - v (both exact here), as the definition of a Gumbel draw from that uniform."""
    n = (hi << 32) + lo
    v, w = (n + 0.5) / 2.0 ** 64, ((2 ** 64 - 1 - n) + 0.5) / 2.0 ** 64
    exponential = -np.log1p(-v) if v < 0.5 else -np.log(w)
    return float(-np.log(exponential))


def test_gumbel_noise_is_exact_in_both_tails():
    """The noise as a function of its 64 random bits equals the float64 definition to float32
    precision everywhere, including the far tails: bits 0 give v = 2^-65, G = 65 ln 2 = 45.05
    (a token 45 logits below the top can still win; the float32 default draw of
    `jax.random.gumbel` stops at 15.9, so a token 16 below the top over a 126k vocabulary would
    win with probability 0.0080 instead of 0.0140); all-ones bits give -ln(45.05) = -3.81.
    Since the bits are uniform, exact values at every bit pattern mean the exact Gumbel
    distribution (to the 2^-64 grid)."""
    rng = np.random.default_rng(0)
    patterns = [(0, 0), (0, 1), (0, 2 ** 32 - 1), (1, 0), (2 ** 31 - 1, 2 ** 32 - 1),
                (2 ** 31, 0), (2 ** 32 - 1, 2 ** 32 - 1), (2 ** 32 - 1, 0), (2 ** 32 - 2, 7)]
    patterns += [(int(h), int(lo)) for h, lo in rng.integers(0, 2 ** 32, size=(200, 2))]
    patterns += [(int(h), int(lo)) for h, lo in zip(rng.integers(0, 64, 50),
                                                     rng.integers(0, 2 ** 32, 50), strict=True)]
    patterns += [(2 ** 32 - 1 - int(h), int(lo)) for h, lo in zip(
        rng.integers(0, 64, 50), rng.integers(0, 2 ** 32, 50), strict=True)]
    bits = jnp.asarray(np.asarray(patterns, np.uint32).T)
    found = np.asarray(gumbel_from_bits(bits), np.float64)
    expected = np.asarray([gumbel_reference(h, lo) for h, lo in patterns])
    np.testing.assert_allclose(found, expected, rtol=2e-6, atol=2e-6)
    assert found[0] == pytest.approx(65 * np.log(2), abs=1e-4)            # 45.05
    assert found[6] == pytest.approx(-np.log(65 * np.log(2)), abs=1e-4)  # -3.81
    # Draws above 16 (never produced by the truncated default) do occur: v < 1.1e-7.
    assert np.sum(found > 16) >= 3


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_draws_follow_the_exact_softmax(temperature):
    """Chi-square of 40,000 candidate draws over a 12-token vocabulary (logits spread over 9 units,
    so the rarest tokens have p ~ 1e-3 at T = 1) against softmax(logits / T) in float64; the
    same counts against the wrong temperature are rejected, which shows the test has power."""
    from scipy import stats

    logits = np.asarray([3.0, 2.5, 2.0, 1.0, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    n = 40_000
    draws = draw_candidates(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, 12)),
                            temperature, jax.random.key(3))
    counts = np.bincount(np.asarray(draws), minlength=12)

    def chi2_pvalue(t):
        p = np.exp(logits / t - np.max(logits / t))
        expected = n * p / p.sum()
        # Pool the rare tail (expected counts < 5) into one bin, as the chi-square test needs.
        rare = expected < 5
        found, wanted = counts[~rare], expected[~rare]
        if rare.any():
            found, wanted = np.append(found, counts[rare].sum()), np.append(wanted,
                                                                            expected[rare].sum())
        return stats.chisquare(found, wanted).pvalue

    assert chi2_pvalue(temperature) > 1e-3
    assert chi2_pvalue(temperature * 1.2) < 1e-6


def test_gumbel_noise_moments():
    """Mean of a standard Gumbel is Euler's gamma 0.5772, variance pi^2 / 6 = 1.6449."""
    g = np.asarray(gumbel_noise(jax.random.key(1), (200_000,)), np.float64)
    assert abs(g.mean() - 0.5772157) < 5 * np.sqrt(1.6449 / g.size)
    assert abs(g.var() - np.pi ** 2 / 6) < 0.03


def eot_forward(tokens, *, positions, **unused):
    """Generated position 3 is a confident EoT (8.0); every other position's favourite is token
    20 + position with rising confidence to the right (so the official order would commit the
    right end first), EOS impossible."""
    del tokens, unused
    vocab = MODEL_CONFIG.vocab_size
    table = np.zeros((2 + 8, vocab), np.float32)
    for q in range(8):
        table[2 + q, 20 + q] = 1.0 + 0.5 * q
        table[2 + q, EOS] = -30.0
    table[2 + 3, EOT] = 8.0
    return jnp.asarray(table)[positions]


def test_stop_at_eot_restricts_commits_before_the_eot():
    """LLaDA-V's rule: the EoT (most confident) is committed at the first step; after that only
    masked positions before it may be committed (0, 1, 2: 3 steps at one token per step, most
    confident first: 2, 1, 0), nothing after it, and the answer after the EoT is EOS. Without
    the rule the positions after the EoT are committed too."""
    prompt = np.full((1, 2), 9)
    tokens, mask, positions = build_canvas(prompt, np.ones_like(prompt, bool), 8, MASK)
    config = sampler_config(gen_length=8, block_length=8, steps=8, stop_at_eot=True)
    out = jax.jit(lambda key: sample(eot_forward, tokens, mask, positions, 2, config, key))(
        jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, 2:],
                                  [20, 21, 22, EOT, EOS, EOS, EOS, EOS])
    np.testing.assert_array_equal(np.asarray(out.commit_pass)[0], [3, 2, 1, 0, -1, -1, -1, -1])
    assert int(out.num_forward_passes) == 4          # the row is finished: the loop ends
    free = jax.jit(lambda key: sample(eot_forward, tokens, mask, positions, 2,
                                      dataclasses.replace(config, stop_at_eot=False), key))(
        jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(free.tokens)[0, 2:],
                                  [20, 21, 22, EOT, 24, 25, 26, 27])


def test_lm_head_runs_on_the_current_block_only():
    """The compiled sampler holds no [rows, canvas, vocab] array: the LM head and the float32
    softmax see the current block (with CFG both halves; after guidance [B, block, V]). A
    prime vocabulary (1009) makes the shapes unambiguous; the same program fed logits instead
    of hidden states (no `head`) does hold [2B, canvas, V], which shows the check can fail."""
    import re

    config = dataclasses.replace(MODEL_CONFIG, vocab_size=1009)
    model = Transformer(config)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    prompt = np.full((2, 5), 9, np.int32)
    tokens, mask, positions = build_canvas(prompt, np.ones_like(prompt, bool), 16, MASK)
    sconfig = sampler_config(block_length=8, steps=8, cfg_scale=1.0, temperature=1.0)

    def shapes(with_head):
        def run(p):
            forward = functools.partial(model.apply, {"params": p})
            head = functools.partial(model.apply, {"params": p},
                                     method=Transformer.logits_from_hidden)
            return sample(forward, tokens, mask, positions, 5, sconfig, jax.random.key(0),
                          head=head if with_head else None).tokens
        text = jax.jit(run).lower(params).compile().as_text()
        return set(re.findall(r"\[(\d+),(\d+),1009\]", text))

    with_head, without_head = shapes(True), shapes(False)
    assert not any(length == "21" for _, length in with_head) and ("2", "8") in with_head
    assert ("4", "21") in without_head
