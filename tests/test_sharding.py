"""Sharded init and train step on 8 fake CPU devices: layouts as the rule table says, and the
same numbers as on one device."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.train import state as state_lib
from llada_jax.train import step as step_lib
from llada_jax.train.optimizer import make_optimizer


def _config(fsdp, tensor, grad_accum_steps=1):
    # The default tiny model: 4 heads, mlp 128, vocab 128, d_model 64 - all divisible by 4 and 8.
    c = config_lib.default_config()
    c.mesh.fsdp, c.mesh.tensor = fsdp, tensor
    c.train.update(batch_size=16, seq_len=32, grad_accum_steps=grad_accum_steps,
                   random_length_prob=0.5, learning_rate=1e-2, warmup_steps=0)
    return c


def _setup(config, devices=None):
    mesh = parallel.make_mesh(config, devices=devices)
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(config.train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    return mesh, rules, model, tx, shardings


def _shard_shape(array):
    return array.addressable_shards[0].data.shape


def test_fsdp_by_tensor_layout_follows_the_rule_table():
    config = _config(fsdp=2, tensor=4)
    mesh, rules, model, tx, shardings = _setup(config)
    state = state_lib.create_train_state(model, tx, mesh, rules, 0, shardings)
    params = state.params
    # Rule table: vocab/heads/mlp -> tensor (4), embed -> fsdp (2), layers/head_dim/norm -> none.
    expected = {
        ("wte",): (P("tensor", "fsdp"), (128 // 4, 64 // 2)),
        ("lm_head", "kernel"): (P("fsdp", "tensor"), (64 // 2, 128 // 4)),
        ("blocks", "attn", "q_proj", "kernel"): (P(None, "fsdp", "tensor", None),
                                                 (2, 64 // 2, 4 // 4, 16)),
        ("blocks", "attn", "attn_out", "kernel"): (P(None, "tensor", None, "fsdp"),
                                                   (2, 4 // 4, 16, 64 // 2)),
        ("blocks", "ff_proj", "kernel"): (P(None, "fsdp", "tensor"), (2, 64 // 2, 128 // 4)),
        ("blocks", "ff_out", "kernel"): (P(None, "tensor", "fsdp"), (2, 128 // 4, 64 // 2)),
        ("blocks", "attn_norm", "scale"): (P(None, None), (2, 64)),
    }
    adam = state.opt_state[1][0]  # (clip, (adam, decay, lr)): Adam's moments
    for path, (spec, shard_shape) in expected.items():
        leaf, mu = params, adam.mu
        for key in path:
            leaf, mu = leaf[key], mu[key]
        assert leaf.sharding.spec == spec, path
        assert _shard_shape(leaf) == shard_shape, path
        assert mu.sharding.spec == spec and _shard_shape(mu) == shard_shape, path
    assert adam.count.sharding.spec == P()
    assert state.step.sharding.spec == P()


def test_pure_fsdp_layout():
    config = _config(fsdp=8, tensor=1)
    mesh, rules, model, tx, shardings = _setup(config)
    state = state_lib.create_train_state(model, tx, mesh, rules, 0, shardings)
    assert _shard_shape(state.params["wte"]) == (128, 64 // 8)
    assert _shard_shape(state.params["blocks"]["up_proj"]["kernel"]) == (2, 64 // 8, 128)
    assert _shard_shape(state.params["blocks"]["attn"]["k_proj"]["kernel"]) == (2, 8, 4, 16)


def _run(config, devices, batches, initial_params=None):
    """Two steps; returns (params at init, losses, final params) on the host.

    With `initial_params` the steps start from those instead of the state's own init.
    """
    mesh, rules, model, tx, shardings = _setup(config, devices)
    state = state_lib.create_train_state(model, tx, mesh, rules, 0, shardings)
    init_params = jax.device_get(state.params)
    if initial_params is not None:
        state = state.replace(params=jax.device_put(initial_params, shardings.params))
    step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    losses = []
    for tokens in batches:
        state, metrics = step(state, parallel.global_batch({"tokens": tokens}, mesh))
        losses.append(float(metrics["loss"]))
    return init_params, losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [rng.integers(4, 100, (16, 32)).astype(np.int32) for _ in range(2)]


@pytest.fixture(scope="module")
def one_device_run(batches):
    return _run(_config(fsdp=1, tensor=1), jax.devices()[:1], batches)


@pytest.mark.parametrize("fsdp,tensor,accum", [(2, 4, 1), (8, 1, 2)])
def test_sharded_step_matches_one_device(fsdp, tensor, accum, batches, one_device_run):
    initial, losses_1, params_1 = one_device_run
    sharded_init, losses_n, params_n = _run(
        _config(fsdp=fsdp, tensor=tensor, grad_accum_steps=accum), None, batches, initial)
    # Parameter init itself does not depend on the layout (partitionable threefry).
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(sharded_init), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses_n, losses_1, rtol=2e-5)
    # Adam's early updates are about lr * sign(g) (lr = 1e-2 here); where |g| is tiny, the
    # different reduction order across shards can move a single update by a fraction of lr.
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_n), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * 1e-2)
    # Something moved: the comparison is not between two copies of the initial params.
    assert not np.allclose(jax.tree.leaves(params_1)[0], jax.tree.leaves(initial)[0])


def test_batch_not_divisible_by_the_mesh_is_a_config_error():
    config = _config(fsdp=8, tensor=1, grad_accum_steps=4)  # 16 rows over 8 * 4
    with pytest.raises(ValueError, match=r"config.train.batch_size: expected a multiple of "
                                         r"mesh.data \* mesh.fsdp \* train.grad_accum_steps = "
                                         r"1 \* 8 \* 4 = 32, found 16"):
        parallel.validate_mesh(config, 8)
    assert isinstance(parallel.batch_sharding(parallel.make_mesh(config), 2), NamedSharding)


def test_mesh_from_plain_axis_sizes():
    """Programs pass the sizes they have (flags) instead of a whole config; an axis not named has
    the config's default size (fsdp -1, the others 1), and the errors are the config's."""
    assert dict(parallel.make_mesh().shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert dict(parallel.make_mesh(data=2, tensor=2).shape) == {
        "data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    mesh = parallel.make_mesh(fsdp=1, tensor=-1, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 4}
    assert parallel.make_mesh(_config(fsdp=2, tensor=4)).shape == parallel.make_mesh(
        fsdp=2, tensor=4).shape
    with pytest.raises(ValueError, match=r"^config.mesh: data=3 \* tensor=1 = 3 does not divide "
                                         r"the 8 devices"):
        parallel.make_mesh(data=3)
    with pytest.raises(TypeError, match=r"unknown mesh axes \['dta'\]"):
        parallel.make_mesh(dta=2)
    with pytest.raises(TypeError, match="not both"):
        parallel.make_mesh(_config(fsdp=8, tensor=1), tensor=1)
