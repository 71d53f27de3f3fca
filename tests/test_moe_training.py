"""A tiny mixture-of-experts LLaDA in the training stack: the sharded step equals the one-device
step (fsdp x expert, and with tensor), the expert-bias update, pre-training that learns with a
balanced expert load, and SFT, sampling and likelihood on it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moe_tiny
from llada_jax import parallel
from llada_jax.config import model_config
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.diffusion.sampler import SamplerConfig, generate
from llada_jax.train import state as state_lib
from llada_jax.train import step as step_lib
from llada_jax.train import trainer
from llada_jax.train.optimizer import make_optimizer

ONE_DEVICE = jax.devices()[:1]


def _config(variant="llada2", fsdp=1, expert=1, tensor=1, **train):
    c = moe_tiny.get_config(variant)
    c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = fsdp, expert, tensor
    c.train.update(batch_size=16, seq_len=32, random_length_prob=0.5, learning_rate=1e-2,
                   warmup_steps=0)
    c.train.update(**train)
    return c


def _run(config, devices, batches, initial_params=None):
    mesh = parallel.make_mesh(config, devices=devices)
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(config.train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    state = state_lib.create_train_state(model, tx, mesh, rules, 0, shardings)
    if initial_params is not None:
        state = state.replace(params=jax.device_put(initial_params, shardings.params))
    init_params, rng = jax.device_get(state.params), jax.device_get(state.rng)
    step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    metrics, params = [], []
    for tokens in batches:
        state, m = step(state, parallel.global_batch({"tokens": tokens}, mesh))
        metrics.append(jax.device_get(m))
        params.append(jax.device_get(state.params))
    return init_params, metrics, params, shardings, rng


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [rng.integers(4, 100, (16, 32)).astype(np.int32) for _ in range(2)]


@pytest.fixture(scope="module")
def one_device_run(batches):
    return _run(_config(), ONE_DEVICE, batches)


@pytest.mark.parametrize("fsdp,expert,tensor", [(2, 4, 1), (2, 2, 2)])
def test_sharded_moe_step_matches_one_device(fsdp, expert, tensor, batches, one_device_run):
    initial, metrics_1, (_, params_1), _, _ = one_device_run
    _, metrics_n, (_, params_n), shardings, _ = _run(
        _config(fsdp=fsdp, expert=expert, tensor=tensor), None, batches, initial)
    # The expert weights really are split over the expert axis (and their hidden over tensor).
    spec = shardings.params["blocks"]["moe"]["wi_gate"].spec
    assert tuple(spec) == (None, "expert", "fsdp", "tensor")
    for name in ("loss", "lm_loss", "moe_aux_loss", "moe_load_max_over_mean"):
        np.testing.assert_allclose([m[name] for m in metrics_n], [m[name] for m in metrics_1],
                                   rtol=2e-5, err_msg=name)
    # Adam's first updates are about lr * sign(g) (lr = 1e-2, each step moves weights by ~1e-2):
    # where a gradient is tiny (an expert that saw few tokens) the different reduction order
    # across shards moves one update by a few percent of lr.
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_n), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * 1e-2)
    assert not np.allclose(params_1["blocks"]["moe"]["wo"], initial["blocks"]["moe"]["wo"])


def test_expert_bias_moves_by_the_load_sign_and_nothing_else(batches, one_device_run):
    """bias += rate * sign(mean load - load) per layer, applied inside the jitted step; weight
    decay (0.1 here) and Adam never touch it."""
    initial, _, (params_1, params_2), _, run_rng = one_device_run
    config = _config()
    rate, decay = config.train.moe_bias_update_rate, config.train.weight_decay
    assert rate > 0 and decay > 0
    bias = [p["blocks"]["moe"]["expert_bias"] for p in (initial, params_1, params_2)]
    moved = bias[1] - bias[0]
    np.testing.assert_allclose(np.abs(moved[moved != 0]), rate, rtol=1e-6)
    assert np.any(moved > 0) and np.any(moved < 0)
    # Step 2 starts from a non-zero bias: decay would move it by lr * 0.1 * bias ~ 1e-6.
    steps = (bias[2] - bias[1]) / rate
    np.testing.assert_allclose(steps, np.round(steps), rtol=0, atol=1e-4)
    # The loads of step 1, recomputed from its noisy batch (the step key is fold_in(rng, 0)).
    model = state_lib.make_model(config)
    rng = jax.random.fold_in(jax.random.wrap_key_data(run_rng), 0)
    prepared = step_lib.prepare_batch({"tokens": jnp.asarray(batches[0])}, config.train,
                                      config.model.mask_token_id, rng, allow_cut=True)
    apply = jax.jit(lambda p, x, m: model.apply({"params": p}, x, attention_mask=m,
                                                mutable=["moe_stats"])[1])
    sown = apply(initial, prepared["noisy_tokens"], prepared.get("key_mask"))
    load = np.asarray(sown["moe_stats"]["router"].load)
    assert load.shape == bias[0].shape
    np.testing.assert_array_equal(np.sign(moved), np.sign(load.mean(-1, keepdims=True) - load))


def test_tiny_moe_pretrains_with_a_balanced_load(tmp_path):
    config = moe_tiny.get_config()
    config.mesh.fsdp = 1
    config.train.update(steps=120, batch_size=16, log_every=10, checkpoint_every=0,
                        warmup_steps=10, moe_aux_loss_weight=0.1)
    result = trainer.train(config, str(tmp_path), devices=ONE_DEVICE)
    history = result.history
    losses = np.array([h["lm_loss"] for h in history])
    assert losses[-20:].mean() < 0.75 * losses[:5].mean(), (losses[:5], losses[-20:])
    # Max / mean expert load of the worst layer: 8 experts, 2 per token, so 4 means every token
    # on the same two experts (about where it starts: the ~50% mask tokens look alike). Measured
    # over the last 20 of 120 steps (2-core CPU): without the balancing loss mean 3.3, max 3.5;
    # with weight 0.1 mean 1.9, max 2.8.
    balance = np.array([h["moe_load_max_over_mean"] for h in history])
    assert balance[-20:].mean() < 2.5 and balance[-20:].max() < 3.2, balance[-20:]
    assert all(h["loss"] >= h["lm_loss"] for h in history)  # the router losses are added


@pytest.fixture(scope="module")
def tiny_moe():
    config = moe_tiny.get_config("llada2")
    model = state_lib.make_model(config)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 8), jnp.int32))["params"])
    return config, model, params


def test_sft_step_on_moe(tiny_moe):
    config, model, params = tiny_moe
    config = _config(objective="sft")
    tx = make_optimizer(config.train)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params),
                                 rng=jax.random.key_data(jax.random.key(0)))
    rng = np.random.default_rng(1)
    maskable = np.zeros((4, 16), bool)
    maskable[:, 6:] = True
    batch = {"tokens": jnp.asarray(rng.integers(4, 100, (4, 16)), jnp.int32),
             "maskable": jnp.asarray(maskable)}
    step = jax.jit(step_lib.train_step_fn(config, model, tx))
    _, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert float(metrics["loss"]) > float(metrics["lm_loss"])


@pytest.mark.parametrize("mode", [dict(), dict(cache="dual", threshold=0.9),
                                  dict(cache="prefix", refresh_every=2, remasking="random")])
def test_sampling_modes_on_moe(tiny_moe, mode):
    config, model, params = tiny_moe
    m = model_config(config)
    sampler = SamplerConfig(gen_length=8, block_length=4, steps=8, mask_id=m.mask_token_id,
                            eos_id=m.eos_token_id, eot_id=-1, **mode)
    prompts = np.array([[1, 40, 41, 42], [2, 2, 50, 51]], np.int32)
    prompt_mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)
    out = np.asarray(generate(params, model, prompts, prompt_mask, sampler, jax.random.key(0)))
    assert out.shape == (2, 12)
    np.testing.assert_array_equal(out[:, :4], prompts)
    assert not np.any(out[:, 4:] == m.mask_token_id)


def test_likelihood_on_moe(tiny_moe):
    _, model, params = tiny_moe
    values = log_likelihood(params, model, [[1, 40, 41], [1, 50]], [[42, 43], [51, 52, 53]],
                            jax.random.key(0), mc_num=8, batch_size=4, pairs_per_call=2,
                            pad_multiple=8, chunk_size=0)
    assert values.shape == (2,) and np.all(np.isfinite(values)) and np.all(values < 0)
