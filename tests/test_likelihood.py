"""The Monte Carlo ELBO against exact expectations computed here by enumerating mask subsets."""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import parallel
from llada_jax.config import ModelConfig, default_config
from llada_jax.diffusion.likelihood import (
    log_likelihood,
    multiple_choice,
    pack_pairs,
    stratified_counts,
)
from llada_jax.model.transformer import Transformer

MASK, EOS, PAD = 3, 2, 0
MODEL_CONFIG = ModelConfig(
    vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
    mlp_hidden_size=64, rope_theta=10000.0, max_sequence_length=32, mask_token_id=MASK,
    eos_token_id=EOS, bos_token_id=1, pad_token_id=PAD, init_std=0.3)


@functools.cache
def tiny():
    model = Transformer(MODEL_CONFIG)
    params = nn.meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params


@functools.cache
def _jitted_model():
    model, params = tiny()
    return jax.jit(lambda x: model.apply({"params": params}, x))


def apply_model(tokens):
    """The model alone on unpadded token rows -> float64 logits."""
    return np.asarray(_jitted_model()(jnp.asarray(tokens, jnp.int32)), np.float64)


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def model_log_probs(sequences, cfg_scale=0.0, prompt_len=None):
    """float64 log-softmax of the model on unpadded sequences [N, L] (CFG masks the prompt)."""
    logits = apply_model(np.asarray(sequences))
    if cfg_scale > 0:
        uncond = np.asarray(sequences).copy()
        uncond[:, :prompt_len] = MASK
        un = apply_model(uncond)
        logits = un + (cfg_scale + 1) * (logits - un)
    return log_softmax(logits)


def hand_counts(k, length, b):
    """REFERENCE.md section 4 with the public reference's wrapping into 1..L."""
    n = [int(np.round(k + j * length / b)) for j in range(b)]   # numpy rounds half to even
    return [(v - 1) % length + 1 for v in n]


def test_stratified_counts_hand_cases():
    # L = 5, b = 2: k + 2.5 rounds half to even; 6, 7 wrap to 1, 2.
    assert hand_counts(1, 5, 2) == [1, 4]
    assert hand_counts(4, 5, 2) == [4, 1]
    assert hand_counts(5, 5, 2) == [5, 3]
    counts = jax.jit(stratified_counts, static_argnums=2)
    for b, lengths in [(2, [5, 1, 4]), (4, [5, 7, 1, 6]), (3, [3, 8])]:
        # Every (k, L) pair with k in 1..L, as one batch of pairs per b.
        ks = np.asarray([k for length in lengths for k in range(1, length + 1)])
        ls = np.asarray([length for length in lengths for _ in range(length)])
        out = np.asarray(counts(jnp.asarray(ks), jnp.asarray(ls), b))
        expected = [hand_counts(k, n, b) for k, n in zip(ks, ls, strict=True)]
        np.testing.assert_array_equal(out, expected)


def exact_moments(prompt, answer, b):
    """Exact mean and variance of one batch loss, enumerating every subset of answer positions.

    g(S) = L/|S| * sum_{i in S} CE_i(tokens with S masked); a batch draws k ~ U{1..L} and, for row
    j, a uniform subset of size n_j(k): E = mean_k mean_j E[g | n_j]; Var = Var_k(mean_j E[g|n_j])
    + mean_k (1/b^2) sum_j Var[g | n_j] (rows are independent given k).
    """
    length = len(answer)
    p = len(prompt)
    seq = np.asarray(list(prompt) + list(answer))
    subsets = [s for n in range(1, length + 1) for s in itertools.combinations(range(length), n)]
    noisy = np.tile(seq, (len(subsets), 1))
    for row, s in enumerate(subsets):
        noisy[row, p + np.asarray(s)] = MASK
    logp = model_log_probs(noisy)
    g_by_size = {n: [] for n in range(1, length + 1)}
    for row, s in enumerate(subsets):
        ce = -sum(logp[row, p + i, seq[p + i]] for i in s)
        g_by_size[len(s)].append(length / len(s) * ce)
    mean_n = {n: np.mean(v) for n, v in g_by_size.items()}
    var_n = {n: np.var(v) for n, v in g_by_size.items()}
    means, variances = [], []
    for k in range(1, length + 1):
        counts = hand_counts(k, length, b)
        means.append(np.mean([mean_n[n] for n in counts]))
        variances.append(sum(var_n[n] for n in counts) / b ** 2)
    return float(np.mean(means)), float(np.var(means) + np.mean(variances))


def test_monte_carlo_converges_to_exact_expectation():
    """Two pairs of different lengths in one padded batch; 5-sigma tolerance from exact moments."""
    model, params = tiny()
    prompts = [[5, 9, 4, 11], [7, 12]]
    answers = [[8, 13, 6], [10, 4, 15, 9, 5]]
    mc_num, b = 1024, 4
    estimates = log_likelihood(params, model, prompts, answers, jax.random.key(0), mc_num=mc_num,
                               batch_size=b, mask_id=MASK, pad_id=PAD, pairs_per_call=2,
                               pad_multiple=4)
    for estimate, prompt, answer in zip(estimates, prompts, answers, strict=True):
        mean, var = exact_moments(prompt, answer, b)
        sigma = math.sqrt(var / (mc_num // b))
        exact_log_likelihood = -mean
        # The test can fail: the tolerance is well below the size of the quantity measured.
        assert 5 * sigma < 0.05 * abs(exact_log_likelihood)
        assert abs(estimate - exact_log_likelihood) < 5 * sigma, (estimate, exact_log_likelihood,
                                                                  sigma)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_single_token_answer_is_exact_log_prob(cfg_scale):
    """mc_num = 1, one answer token: the estimate is log p(token | prompt, masked slot)."""
    model, params = tiny()
    prompts = [[5, 9, 4, 11], [7, 12, 14]]
    answers = [[8], [13]]
    estimates = log_likelihood(params, model, prompts, answers, jax.random.key(1), mc_num=1,
                               batch_size=1, cfg_scale=cfg_scale, mask_id=MASK, pad_id=PAD,
                               pairs_per_call=2, pad_multiple=1)
    for estimate, prompt, answer in zip(estimates, prompts, answers, strict=True):
        logp = model_log_probs([[*prompt, MASK]], cfg_scale, prompt_len=len(prompt))
        np.testing.assert_allclose(estimate, logp[0, len(prompt), answer[0]], rtol=1e-5,
                                   atol=1e-5)


def test_multiple_choice_accuracy():
    """Single-token options: the prediction is the argmax of exact log-probs."""
    model, params = tiny()
    rng = np.random.default_rng(0)
    contexts = [list(rng.integers(4, 16, size=n)) for n in (3, 5, 4, 2)]
    choices = [[[5], [9], [12]], [[4], [7]], [[6], [10], [11], [15]], [[8], [14]]]
    best = []
    for context, options in zip(contexts, choices, strict=True):
        logp = model_log_probs([[*context, MASK]])[0, len(context)]
        best.append(int(np.argmax([logp[o[0]] for o in options])))
    # Right on the first two questions, wrong on the last two: accuracy exactly 0.5.
    labels = [*best[:2], (best[2] + 1) % 4, (best[3] + 1) % 2]
    out = multiple_choice(params, model, contexts, choices, jax.random.key(2), labels=labels,
                          mc_num=1, batch_size=1, mask_id=MASK, pad_id=PAD, pairs_per_call=4)
    np.testing.assert_array_equal(out["predictions"], best)
    assert out["accuracy"] == 0.5
    assert [len(s) for s in out["scores"]] == [3, 2, 4, 2]


def test_pack_pairs_layout():
    batch = pack_pairs([[5, 6], [7]], [[8], [9, 10, 11]], PAD, multiple=1)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["answer_mask"], [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]])


def test_errors():
    model, params = tiny()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="mc_num=10 must be a positive multiple of batch_size=4"):
        log_likelihood(params, model, [[5]], [[6]], key, mc_num=10, batch_size=4)
    with pytest.raises(ValueError, match="answer 0 is empty"):
        log_likelihood(params, model, [[5]], [[]], key, mc_num=4, batch_size=4)
    with pytest.raises(ValueError, match="max_sequence_length=32"):
        log_likelihood(params, model, [[5] * 30], [[6] * 5], key, mc_num=4, batch_size=4,
                       pad_multiple=1)
    with pytest.raises(ValueError, match="pad_id=3 must differ from mask_id=3"):
        log_likelihood(params, model, [[5]], [[6]], key, mc_num=4, batch_size=4, pad_id=MASK)
    with pytest.raises(ValueError, match="label 3 of question 0"):
        multiple_choice(params, model, [[5]], [[[6], [7]]], key, labels=[3], mc_num=1,
                        batch_size=1)


def test_sharded_estimate_matches_single_device():
    model, params = tiny()
    prompts, answers = [[5, 9, 4], [7, 12]], [[8, 13], [10, 4, 15]]
    kwargs = {"mc_num": 8, "batch_size": 4, "cfg_scale": 0.5, "mask_id": MASK, "pad_id": PAD,
              "pairs_per_call": 2, "pad_multiple": 4}
    expected = log_likelihood(params, model, prompts, answers, jax.random.key(5), **kwargs)
    config = default_config()
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh = parallel.make_mesh(config)
    rules = parallel.logical_rules(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((8, 4), jnp.int32)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.device_put(params, parallel.logical_to_sharding(boxed["params"], mesh,
                                                                      rules))
        out = log_likelihood(sharded, model, prompts, answers, jax.random.key(5), **kwargs)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
