"""Optimizer, schedules, gradient accumulation, learning, resume and fine-tuning init."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.train import checkpoint as checkpoint_lib
from llada_jax.train import state as state_lib
from llada_jax.train import step as step_lib
from llada_jax.train import trainer
from llada_jax.train.optimizer import make_optimizer, make_schedule, weight_decay_mask


def _train_section(**overrides):
    c = config_lib.default_config()
    for key, value in overrides.items():
        c.train[key] = value
    return c.train


def _init_params(config, seed):
    model = state_lib.make_model(config)
    init = jax.jit(lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, 4), jnp.int32))))
    return init(jax.random.key(seed))["params"]


def test_wsd_schedule_hand_values():
    t = _train_section(learning_rate=1.0, steps=100, warmup_steps=10, schedule="wsd",
                       decay_fraction=0.2, min_lr_ratio=0.1)
    lr = make_schedule(t)
    # warmup (s + 1) / 10; stable 1.0 until step 80; linear to 0.1 at step 100.
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 50: 1.0, 80: 1.0, 85: 1.0 - 0.9 * 5 / 20,
                90: 0.55, 99: 1.0 - 0.9 * 19 / 20, 100: 0.1}
    for step, value in expected.items():
        np.testing.assert_allclose(lr(step), value, rtol=1e-6, err_msg=f"step {step}")


def test_cosine_and_constant_schedule_hand_values():
    lr = make_schedule(_train_section(learning_rate=2.0, steps=110, warmup_steps=10,
                                      schedule="cosine", min_lr_ratio=0.0))
    expected = {0: 0.2, 9: 2.0, 10: 2.0, 35: 1.0 + math.cos(math.pi / 4), 60: 1.0, 110: 0.0}
    for step, value in expected.items():
        np.testing.assert_allclose(lr(step), value, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
    lr = make_schedule(_train_section(learning_rate=2.0, steps=50, warmup_steps=4,
                                      schedule="constant"))
    np.testing.assert_allclose([lr(s) for s in (0, 3, 4, 49)], [0.5, 2.0, 2.0, 2.0], rtol=1e-6)


def test_weight_decay_skips_norm_scales():
    config = config_lib.default_config()
    config.train.update(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    params = _init_params(config, seed=0)
    mask = weight_decay_mask(params)
    assert mask["blocks"]["attn_norm"]["scale"] is False and mask["ln_f"]["scale"] is False
    assert mask["wte"] is True and mask["blocks"]["ff_out"]["kernel"] is True
    # With a zero gradient Adam's step is 0, so AdamW changes a parameter only by its decay:
    # p <- p - lr * wd * p for decayed parameters, untouched norm scales.
    tx = make_optimizer(config.train)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["wte"], -0.1 * 0.5 * params["wte"], rtol=1e-6)
    np.testing.assert_array_equal(updates["blocks"]["ff_norm"]["scale"], 0.0)


def _single_device_setup(config):
    mesh = parallel.make_mesh(config, devices=jax.devices()[:1])
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(config.train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    state = state_lib.create_train_state(model, tx, mesh, rules, 0, shardings)
    return mesh, model, tx, shardings, state


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_grad_accumulation_equals_one_big_batch(objective):
    results = []
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 100, (8, 16)).astype(np.int32)
    maskable = np.zeros((8, 16), bool)
    maskable[:, rng.integers(2, 8):] = True
    for accum in (1, 4):
        config = config_lib.default_config()
        config.train.update(seq_len=16, batch_size=8, grad_accum_steps=accum, objective=objective,
                            random_length_prob=0.0)
        mesh, model, tx, shardings, state = _single_device_setup(config)
        step = step_lib.make_train_step(config, model, tx, mesh, shardings)
        batch = {"tokens": tokens}
        if objective == "sft":
            batch["maskable"] = maskable
        initial = jax.device_get(state.params)
        new_state, metrics = step(state, parallel.global_batch(batch, mesh))
        update = jax.tree.map(lambda new, old: new - old, jax.device_get(new_state.params),
                              initial)
        results.append((update, jax.device_get(metrics)))
    (update_1, metrics_1), (update_4, metrics_4) = results
    np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
    assert metrics_4["noised_tokens"] == metrics_1["noised_tokens"]
    # Adam's first update is about lr * sign(g): where |g| is tiny, float rounding between the
    # two summation orders moves it by a fraction of lr, so compare on that scale.
    lr = float(metrics_1["learning_rate"])
    for a, b in zip(jax.tree.leaves(update_1), jax.tree.leaves(update_4), strict=True):
        np.testing.assert_allclose(a, b, atol=0.02 * lr, rtol=0)
    assert max(np.abs(a).max() for a in jax.tree.leaves(update_1)) > 0.5 * lr


def _tiny_run_config(steps, **train):
    c = config_lib.default_config()
    c.mesh.fsdp = 1
    c.train.update(steps=steps, batch_size=16, seq_len=64, warmup_steps=min(10, steps),
                   log_every=5, checkpoint_every=0, learning_rate=3e-3)
    c.train.update(**train)
    return c


# Trainer runs use the first device only: quicker than 8 fake devices on a small CPU.
ONE_DEVICE = jax.devices()[:1]


def test_tiny_model_learns(tmp_path):
    result = trainer.train(_tiny_run_config(150), str(tmp_path), devices=ONE_DEVICE)
    losses = np.array([h["loss"] for h in result.history])
    accuracy = np.array([h["accuracy"] for h in result.history])
    assert len(losses) == 150
    # At initialisation the loss is about ln(128) ~ 4.85 (times the 1/p weighting's average 1);
    # the synthetic corpus's templates are learnt fast.
    assert losses[-20:].mean() < 0.75 * losses[:5].mean(), (losses[:5], losses[-20:])
    assert accuracy[-20:].mean() > accuracy[:5].mean() + 0.1
    assert (tmp_path / "checkpoints" / "150").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_gives_the_uninterrupted_run(tmp_path):
    # Random-length cuts on half the batches, so the step's RNG is exercised too.
    config = _tiny_run_config(8, random_length_prob=0.5, batch_size=8, seq_len=32, log_every=1)
    straight = trainer.train(config, str(tmp_path / "straight"), devices=ONE_DEVICE)
    first = trainer.train(config, str(tmp_path / "resumed"), stop_after=4, devices=ONE_DEVICE)
    assert len(first.history) == 4 and int(first.state.step) == 4
    second = trainer.train(config, str(tmp_path / "resumed"), devices=ONE_DEVICE)
    assert [h["step"] for h in second.history] == [4, 5, 6, 7]
    resumed_losses = [h["loss"] for h in first.history + second.history]
    np.testing.assert_allclose(resumed_losses, [h["loss"] for h in straight.history], rtol=1e-6)
    np.testing.assert_array_equal([h["cut_length"] for h in first.history + second.history],
                                  [h["cut_length"] for h in straight.history])
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_init_from_params_checkpoint(tmp_path):
    config = _tiny_run_config(4)
    params = _init_params(config, seed=7)
    checkpoint_lib.save_params(str(tmp_path / "pretrained"), config, params)
    config.train.init_from = str(tmp_path / "pretrained")
    result = trainer.train(config, str(tmp_path / "finetune"), stop_after=0, devices=ONE_DEVICE)
    assert int(result.state.step) == 0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    wider = _tiny_run_config(4)
    wider.model.mlp_hidden_size = 256
    wider.train.init_from = str(tmp_path / "pretrained")
    with pytest.raises(ValueError, match=r"config.train.init_from: param \['blocks'\]\['ff_.*"
                                         r"expected shape \(2, .*256.*\), found \(2, .*128.*\)"):
        trainer.train(wider, str(tmp_path / "wider"), stop_after=0, devices=ONE_DEVICE)


def test_tokenizer_mismatch_is_a_config_error(tmp_path):
    config = _tiny_run_config(2)
    config.model.mask_token_id = 5
    with pytest.raises(ValueError, match=r"config.model.mask_token_id: expected 3"):
        trainer.train(config, str(tmp_path), devices=ONE_DEVICE)


def test_group_learning_rates_shared_by_every_group_replace_the_base_rate():
    # Every group at 0.2 while train.learning_rate is 0.1: the groups' rate is the one used.
    # With a zero gradient AdamW moves a decayed parameter by -lr * wd * p only (see above).
    config = config_lib.default_config()
    config.train.update(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    for group in config.train.group_learning_rates:
        config.train.group_learning_rates[group] = 0.2
    params = _init_params(config, seed=0)
    tx = make_optimizer(config.train)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["wte"], -0.2 * 0.5 * params["wte"], rtol=1e-6)
    # The step logs the rate it trains with.
    config.train.update(seq_len=16, batch_size=8)
    mesh, model, tx, shardings, state = _single_device_setup(config)
    step = step_lib.make_train_step(config, model, tx, mesh, shardings)
    tokens = np.random.default_rng(0).integers(4, 100, (8, 16)).astype(np.int32)
    _, metrics = step(state, parallel.global_batch({"tokens": tokens}, mesh))
    assert float(metrics["learning_rate"]) == pytest.approx(0.2)
