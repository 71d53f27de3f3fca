"""The train step's hand-written backward passes: the chunked LM head + CE and the embedding.

`losses.lm_head_cross_entropy` (custom_vjp, vocabulary-parallel on a mesh) must give the values
and gradients of the plain computation `CE(h @ W)` differentiated by `jax.grad`, written here
from the definition; `transformer.embedding_lookup` must give `table[tokens]` and the
scatter-add gradient (NumPy `np.add.at`). Both are checked alone and on an 8-device FSDP mesh,
where the compiled program must not hold a whole [d, V] float32 buffer on any device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llada_jax.diffusion import losses
from llada_jax.model.transformer import embedding_lookup

BATCH, LENGTH, D_MODEL, VOCAB = 8, 12, 16, 64


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(BATCH, LENGTH, D_MODEL)).astype(np.float32)
    kernel = (rng.normal(size=(D_MODEL, VOCAB)) / 4).astype(np.float32)
    targets = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    weights = rng.uniform(size=(BATCH, LENGTH)).astype(np.float32)
    weights[:, -3:] = 0.0  # positions that do not count (padding) get a zero cotangent
    return hidden, kernel, targets, weights


def _plain_loss(hidden, kernel, targets, weights, dtype):
    """sum of weight * CE of the logits h @ W computed in `dtype`, CE in float32."""
    logits = jnp.einsum("bld,dv->blv", hidden.astype(dtype), kernel.astype(dtype))
    logits = logits.astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_normaliser - target_logit
    return jnp.sum(ce * weights), (ce, jnp.argmax(logits, axis=-1) == targets)


def _head_loss(hidden, kernel, targets, weights, dtype, chunk):
    ce, hits = losses.lm_head_cross_entropy(hidden, kernel, targets, chunk, dtype)
    return jnp.sum(ce * weights), (ce, hits)


@pytest.mark.parametrize("dtype,chunk,tol", [(jnp.float32, 4, 1e-5), (jnp.float32, 5, 1e-5),
                                             (jnp.float32, 40, 1e-5), (jnp.bfloat16, 4, 2e-2)])
def test_lm_head_cross_entropy_matches_the_plain_gradient(dtype, chunk, tol):
    hidden, kernel, targets, weights = (jnp.asarray(x) for x in _inputs())
    grad = jax.value_and_grad(_plain_loss, argnums=(0, 1), has_aux=True)
    (loss, (ce, hits)), (dh, dw) = jax.jit(grad, static_argnums=4)(
        hidden, kernel, targets, weights, dtype)
    head = jax.value_and_grad(_head_loss, argnums=(0, 1), has_aux=True)
    (loss_c, (ce_c, hits_c)), (dh_c, dw_c) = jax.jit(head, static_argnums=(4, 5))(
        hidden, kernel, targets, weights, dtype, chunk)
    np.testing.assert_allclose(float(loss_c), float(loss), rtol=tol)
    np.testing.assert_allclose(np.asarray(ce_c), np.asarray(ce), rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(hits_c), np.asarray(hits))
    scale_h, scale_w = float(jnp.abs(dh).max()), float(jnp.abs(dw).max())
    np.testing.assert_allclose(np.asarray(dh_c, np.float32), np.asarray(dh, np.float32),
                               atol=tol * scale_h)
    np.testing.assert_allclose(np.asarray(dw_c), np.asarray(dw), atol=tol * scale_w)
    assert dh_c.dtype == hidden.dtype and dw_c.dtype == kernel.dtype
    assert not np.any(np.asarray(dh_c)[:, -3:])  # zero cotangent -> zero hidden gradient


def _fsdp_mesh():
    return jax.make_mesh((1, 8, 1, 1), ("data", "fsdp", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)


RULES = (("embed", "fsdp"), ("vocab", "tensor"))


def test_lm_head_cross_entropy_on_a_mesh_keeps_the_kernel_gradient_split():
    hidden, kernel, targets, weights = _inputs(1)
    head = jax.value_and_grad(_head_loss, argnums=(0, 1), has_aux=True)
    expected = jax.jit(head, static_argnums=(4, 5))(hidden, kernel, targets, weights,
                                                    jnp.float32, 4)
    mesh = _fsdp_mesh()
    rows, model_dim = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P("fsdp", None))
    args = (jax.device_put(hidden, rows), jax.device_put(kernel, model_dim),
            jax.device_put(targets, rows), jax.device_put(weights, rows))
    with jax.set_mesh(mesh):
        fn = jax.jit(head, static_argnums=(4, 5), out_shardings=(
            (NamedSharding(mesh, P()), (rows, rows)), (rows, model_dim)))
        got = fn(*args, jnp.float32, 4)
        text = fn.lower(*args, jnp.float32, 4).compile().as_text()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-6), got, expected)
    # Per device, the kernel and its gradient are [16, 8] pieces; the whole [16, 64] never is.
    assert f"f32[{D_MODEL},{VOCAB // 8}]" in text
    assert f"f32[{D_MODEL},{VOCAB}]" not in text


@pytest.mark.parametrize("on_mesh", [False, True])
def test_embedding_lookup_rows_and_scatter_add_gradient(on_mesh):
    rng = np.random.default_rng(2)
    table = rng.normal(size=(VOCAB, D_MODEL)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    tokens[0, :4] = 7  # repeated tokens: their gradients add up
    upstream = rng.normal(size=(BATCH, LENGTH, D_MODEL)).astype(np.float32)

    def loss(t, ids):
        return jnp.sum(embedding_lookup(t, ids) * upstream)

    fn = jax.jit(jax.value_and_grad(loss))
    args = (jnp.asarray(table), jnp.asarray(tokens))
    if on_mesh:
        mesh = _fsdp_mesh()
        args = (jax.device_put(table, NamedSharding(mesh, P(None, "fsdp"))),
                jax.device_put(tokens, NamedSharding(mesh, P("fsdp"))))
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            value, grad = fn(*args)
            text = fn.lower(*args).compile().as_text()
        assert f"f32[{VOCAB},{D_MODEL // 8}]" in text
        assert f"f32[{VOCAB},{D_MODEL}]" not in text
    else:
        value, grad = fn(*args)
    expected_grad = np.zeros_like(table)
    np.add.at(expected_grad, tokens, upstream)
    np.testing.assert_allclose(float(value), float(np.sum(table[tokens] * upstream)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-5)


def test_sharded_train_step_with_loss_chunks_matches_one_device():
    """The whole step (custom-vjp head and embedding) on a 2 x 4 (fsdp x tensor) mesh equals
    the one-device step; vocabulary 100 is split only over the axes that divide it (fsdp)."""
    from tests.test_sharding import _config, _run

    def config(fsdp, tensor):
        c = _config(fsdp, tensor)
        c.model.vocab_size = 100
        c.train.loss_chunk_size = 8  # 32 positions: 4 chunks
        return c

    rng = np.random.default_rng(3)
    batches = [rng.integers(4, 100, (16, 32)).astype(np.int32) for _ in range(2)]
    initial, losses_1, params_1 = _run(config(1, 1), jax.devices()[:1], batches)
    _, losses_n, params_n = _run(config(2, 4), None, batches, initial)
    np.testing.assert_allclose(losses_n, losses_1, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_n), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)  # as tests/test_sharding.py
    assert not np.allclose(jax.tree.leaves(params_1)[0], jax.tree.leaves(initial)[0])
