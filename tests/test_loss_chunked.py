"""The memory-lean loss: cross-entropy over chunks of the sequence (train.loss_chunk_size).

Values and gradients are checked against first principles (NumPy: CE = logsumexp - target
logit, dCE/dlogits = softmax - onehot), against the unchunked step for every objective, and the
compiled program is checked to hold no [B, L, V] logits buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import config as config_lib
from llada_jax.diffusion import likelihood, losses
from llada_jax.model.transformer import Transformer
from llada_jax.train import step as step_lib
from tests.test_model import tiny


@pytest.mark.parametrize("chunk", [0, 4, 5, 12, 40])
def test_chunked_cross_entropy_values_and_gradients_from_first_principles(chunk):
    rng = np.random.default_rng(0)
    batch, length, d, vocab = 2, 12, 6, 9
    hidden = rng.normal(size=(batch, length, d)).astype(np.float32)
    head = rng.normal(size=(d, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    weights = rng.uniform(size=(batch, length)).astype(np.float32)
    hidden[0, 0] = 0.0  # all logits equal: argmax is the first index (target 0 hits, else not)
    targets[0, 0] = 0

    def weighted_loss(h, w):
        ce, hits = losses.chunked_cross_entropy(lambda x: x @ w, h, jnp.asarray(targets), chunk)
        return jnp.sum(ce * weights), (ce, hits)

    (_, (ce, hits)), (grad_h, grad_w) = jax.value_and_grad(
        weighted_loss, argnums=(0, 1), has_aux=True)(jnp.asarray(hidden), jnp.asarray(head))

    logits = hidden.astype(np.float64) @ head
    top = logits.max(-1, keepdims=True)
    log_normaliser = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(ce), log_normaliser - target_logit, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(hits), logits.argmax(-1) == targets)
    assert bool(hits[0, 0])
    softmax = np.exp(logits - log_normaliser[..., None])
    dlogits = (softmax - np.eye(vocab)[targets]) * weights[..., None]
    np.testing.assert_allclose(np.asarray(grad_h), dlogits @ head.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_w),
                               np.einsum("bld,blv->dv", hidden, dlogits), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    """test_model's tiny model and its parameters, initialised once for the whole file (every
    test compares two computations on the same parameters)."""
    model = Transformer(tiny())
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def _prepared(objective, rows=4, length=24):
    train = config_lib.default_config().train
    train.objective = objective
    train.random_length_prob = 1.0 if objective == "pretrain" else 0.0
    train.mask_eps = 0.2
    tokens = jax.random.randint(jax.random.key(1), (rows, length), 8, 90)
    batch = {"tokens": tokens}
    if objective != "pretrain":
        batch["maskable"] = jnp.arange(length)[None, :] >= jnp.array([[3], [5], [2], [7]])
        batch["fill"] = jnp.arange(length)[None, :] >= jnp.array([[20], [14], [24], [17]])
    return step_lib.prepare_batch(batch, train, 5, jax.random.key(4), allow_cut=True,
                                  num_micro_batches=1)


@pytest.mark.parametrize("objective", ["pretrain", "sft", "masked_response"])
def test_chunked_step_loss_has_the_same_value_gradient_and_accuracy(objective, tiny_model):
    model, params = tiny_model
    prepared = _prepared(objective)

    def run(chunk):
        fn = jax.value_and_grad(step_lib.make_loss_fn(model, objective, chunk), has_aux=True)
        return jax.jit(fn)(params, prepared)

    (loss, counts), grads = run(0)
    assert int(counts["noised"]) > 0
    for chunk in (8, 7):  # 24 = 3 chunks of 8; 7 does not divide 24 (the last chunk is padded)
        (loss_c, counts_c), grads_c = run(chunk)
        np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-6)
        assert int(counts_c["correct"]) == int(counts["correct"])
        assert int(counts_c["noised"]) == int(counts["noised"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     grads_c, grads)


def test_compiled_chunked_step_holds_no_full_logits(tiny_model):
    """The HLO of the value-and-gradient program: with chunking no [B, L, V] array of any dtype
    appears (forward or backward); without it, it does (the check can fail)."""
    model, params = tiny_model
    config = model.config
    prepared = _prepared("pretrain", length=48)
    full_shape = f"[4,48,{config.vocab_size}]"

    def hlo(chunk):
        fn = jax.value_and_grad(step_lib.make_loss_fn(model, "pretrain", chunk), has_aux=True)
        return jax.jit(fn).lower(params, prepared).compile().as_text()

    assert full_shape in hlo(0)
    chunked = hlo(16)
    assert full_shape not in chunked
    assert f"[4,16,{config.vocab_size}]" in chunked


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_chunked_likelihood_equals_unchunked(cfg_scale, tiny_model):
    model, params = tiny_model
    batch = likelihood.pack_pairs([[9, 10, 11], [12]], [[20, 21, 22, 23, 24], [30, 31]], pad_id=2,
                                  multiple=4)
    variables = {"params": params}
    forward = functools.partial(model.apply, variables)

    def head(hidden):
        return model.apply(variables, hidden, method="logits_from_hidden")

    def estimate(**kw):
        return np.asarray(jax.jit(functools.partial(
            likelihood.elbo_estimate, mc_num=8, batch_size=4, cfg_scale=cfg_scale, mask_id=5,
            **kw), static_argnums=0)(forward, *(jnp.asarray(batch[k]) for k in (
                "tokens", "attention_mask", "positions", "answer_mask")), jax.random.key(3)))

    plain = estimate()
    for chunk in (0, 3):
        np.testing.assert_allclose(estimate(head=head, chunk_size=chunk), plain, rtol=1e-5)
