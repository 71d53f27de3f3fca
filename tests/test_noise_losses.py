"""Forward process and objectives (REFERENCE.md section 2) against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import config as config_lib
from llada_jax.diffusion import losses, noise
from llada_jax.train import state as state_lib
from llada_jax.train import step as step_lib

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
# Over a vocabulary of 3: logits [ln 2, 0, 0] give probabilities [1/2, 1/4, 1/4], so CE is ln 2
# for token 0 and ln 4 for tokens 1, 2; uniform logits give CE ln 3 for every token.
PEAKED = [LN2, 0.0, 0.0]
UNIFORM = [0.0, 0.0, 0.0]


def test_cross_entropy_hand_values():
    logits = jnp.array([[PEAKED, PEAKED, UNIFORM]], jnp.bfloat16)  # bf16 in, float32 out
    ce, hits = losses.cross_entropy_and_hits(logits, jnp.array([[0, 2, 1]]))
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(ce, [[LN2, LN4, LN3]], rtol=1e-2)
    np.testing.assert_array_equal(hits, [[True, False, False]])  # argmax 0 everywhere


def test_pretrain_loss_hand_computed():
    logits = jnp.array([[PEAKED, UNIFORM], [UNIFORM, PEAKED]], jnp.float32)
    targets = jnp.array([[0, 2], [1, 1]])
    noised = jnp.array([[True, False], [True, True]])
    p = jnp.array([0.5, 0.25])
    # sum of CE / p over noised: ln2 / 0.5 + ln3 / 0.25 + ln4 / 0.25 = 10 ln2 + 4 ln3.
    total = 10 * LN2 + 4 * LN3
    ce, _ = losses.cross_entropy_and_hits(logits, targets)
    # Uncut: normalised by batch * L = 2 * 2.
    np.testing.assert_allclose(losses.pretrain_loss(ce, noised, p, 2), total / (2 * 2), rtol=1e-6)
    # A random-length cut to 1 position normalises by batch * 1.
    np.testing.assert_allclose(losses.pretrain_loss(ce, noised, p, 1), total / 2, rtol=1e-6)


def test_sft_loss_counts_eos_padding_in_answer_length():
    eos = 2
    # Row 0: prompt, answer token, EOS padding -> answer_len 2 (the EOS counts).
    # Row 1: prompt, prompt, answer token -> answer_len 1.
    targets = jnp.array([[1, 0, eos], [1, 1, 1]])
    maskable = jnp.array([[False, True, True], [False, False, True]])
    noised = jnp.array([[False, True, True], [False, False, True]])
    logits = jnp.array([[UNIFORM, PEAKED, UNIFORM], [PEAKED, PEAKED, PEAKED]], jnp.float32)
    p = jnp.array([0.5, 0.2])
    row0 = (LN2 / 0.5 + LN3 / 0.5) / 2      # answer + its EOS padding
    row1 = (LN4 / 0.2) / 1
    ce, _ = losses.cross_entropy_and_hits(logits, targets)
    np.testing.assert_allclose(losses.sft_loss(ce, noised, p, maskable), (row0 + row1) / 2,
                               rtol=1e-6)


def test_hit_counts_only_noised():
    logits = jnp.array([[PEAKED, PEAKED, UNIFORM]], jnp.float32)  # argmax 0 everywhere
    _, hits = losses.cross_entropy_and_hits(logits, jnp.array([[0, 1, 0]]))
    correct, count = losses.hit_counts(hits, jnp.array([[True, True, False]]))
    assert (int(correct), int(count)) == (1, 2)


def test_mask_tokens_is_bernoulli_p_per_row():
    rows, length, mask_id = 64, 512, 3
    tokens = jnp.full((rows, length), 7, jnp.int32)
    p = jnp.linspace(0.05, 0.95, rows)
    maskable = jnp.ones((rows, length), bool).at[:, :16].set(False)  # a 16-token "prompt"
    out = noise.mask_tokens(jax.random.key(0), tokens, p, mask_id, maskable)
    noised = np.asarray(out.noised)
    assert not noised[:, :16].any()
    np.testing.assert_array_equal(np.asarray(out.noisy_tokens), np.where(noised, mask_id, 7))
    n = length - 16
    counts = noised.sum(axis=1)
    expected = n * np.asarray(p)
    std = np.sqrt(n * np.asarray(p) * (1 - np.asarray(p)))
    # 5 binomial standard deviations per row: a false alarm has probability ~1e-6 per row.
    assert np.all(np.abs(counts - expected) < 5 * std), (counts, expected)
    assert abs(counts.sum() - expected.sum()) < 5 * np.sqrt((std ** 2).sum())


def test_forward_process_mask_probability_range_and_mean():
    eps, rows = 1e-3, 20000
    out = noise.forward_process(jax.random.key(1), jnp.zeros((rows, 1), jnp.int32), 3, eps)
    p = np.asarray(out.mask_prob)
    assert p.min() >= eps and p.max() <= 1.0
    # p = (1 - eps) t + eps with t ~ U(0, 1): mean (1 + eps) / 2, std (1 - eps) / sqrt(12 rows).
    assert abs(p.mean() - (1 + eps) / 2) < 5 * (1 - eps) / math.sqrt(12 * rows)


def test_random_length_cut_frequency_and_range():
    seq_len, draws, prob = 8, 20000, 0.25
    keys = jax.random.split(jax.random.key(2), draws)
    cuts, valid = jax.vmap(lambda k: noise.random_length_cut(k, seq_len, prob))(keys)
    cuts, valid = np.asarray(cuts), np.asarray(valid)
    assert cuts.min() >= 1 and cuts.max() <= seq_len
    np.testing.assert_array_equal(valid, np.arange(seq_len)[None, :] < cuts[:, None])
    # A cut shorter than seq_len happens with probability prob * (seq_len - 1) / seq_len.
    q = prob * (seq_len - 1) / seq_len
    assert abs((cuts < seq_len).mean() - q) < 5 * math.sqrt(q * (1 - q) / draws)
    assert set(np.unique(cuts[cuts < seq_len])) == set(range(1, seq_len))
    never = jax.vmap(lambda k: noise.random_length_cut(k, seq_len, 0.0))(keys)[0]
    assert np.all(np.asarray(never) == seq_len)


def _tiny_config():
    c = config_lib.default_config()
    c.train.seq_len = 16
    c.train.random_length_prob = 1.0  # always cut
    return c


def test_random_length_batch_excludes_positions_past_the_cut():
    config = _tiny_config()
    model = state_lib.make_model(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    loss_fn = jax.jit(step_lib.make_loss_fn(model, "pretrain"))
    rng = jax.random.key(5)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 4, 100)
    prepared = step_lib.prepare_batch({"tokens": tokens}, config.train, 3, rng, allow_cut=True)
    cut = int(prepared["cut_length"][0])
    assert 1 <= cut < 16  # this key draws a real cut
    assert not np.asarray(prepared["noised"])[:, cut:].any()
    assert not np.asarray(prepared["key_mask"])[:, cut:].any()
    assert np.asarray(prepared["key_mask"])[:, :cut].all()

    # Changing every token past the cut changes neither the noise before it nor the loss:
    # those positions are neither attended to, nor masked, nor scored.
    other = tokens.at[:, cut:].set(50)
    prepared_other = step_lib.prepare_batch({"tokens": other}, config.train, 3, rng,
                                            allow_cut=True)
    np.testing.assert_array_equal(prepared["noised"], prepared_other["noised"])
    loss, _ = loss_fn(params, prepared)
    loss_other, _ = loss_fn(params, prepared_other)
    np.testing.assert_allclose(loss, loss_other, rtol=1e-6)

    # The normaliser is batch * cut: the same noised CE sum over batch * seq_len would differ.
    logits = jax.jit(model.apply)({"params": params}, prepared["noisy_tokens"],
                                  attention_mask=prepared["key_mask"])
    ce = np.asarray(losses.cross_entropy_and_hits(logits, tokens)[0])
    weighted = np.where(np.asarray(prepared["noised"]),
                        ce / np.asarray(prepared["mask_prob"])[:, None], 0.0)
    np.testing.assert_allclose(loss, weighted.sum() / (4 * cut), rtol=1e-5)


def test_sft_batches_never_noise_the_prompt_and_are_never_cut():
    config = _tiny_config()
    config.train.objective = "sft"
    tokens = jnp.full((8, 16), 9, jnp.int32)
    maskable = jnp.zeros((8, 16), bool).at[:, 6:].set(True)
    prepared = step_lib.prepare_batch({"tokens": tokens, "maskable": maskable}, config.train, 3,
                                      jax.random.key(0), allow_cut=True)
    assert int(prepared["cut_length"][0]) == 16
    noisy = np.asarray(prepared["noisy_tokens"])
    assert np.all(noisy[:, :6] == 9)
    assert np.asarray(prepared["noised"])[:, 6:].any()


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_mask_eps_out_of_range_is_a_config_error(eps):
    config = config_lib.default_config()
    config.train.mask_eps = eps
    with pytest.raises(ValueError, match="config.train.mask_eps"):
        config_lib.validate(config)
