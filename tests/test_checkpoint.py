"""Checkpoints: sharded round trip, data-iterator position, atomicity, params-only checkpoints."""

import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.data import pipeline
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.train import checkpoint as checkpoint_lib
from llada_jax.train import state as state_lib
from llada_jax.train.optimizer import make_optimizer


@pytest.fixture(scope="module")
def sharded():
    """A state on a (fsdp 2, tensor 4) mesh of the 8 fake CPU devices."""
    config = config_lib.default_config()
    config.mesh.fsdp, config.mesh.tensor = 2, 4
    mesh = parallel.make_mesh(config)
    rules = parallel.logical_rules(config)
    model = state_lib.make_model(config)
    tx = make_optimizer(config.train)
    shardings = state_lib.state_shardings(model, tx, mesh, rules)
    state = state_lib.create_train_state(model, tx, mesh, rules, 0, shardings)
    return config, mesh, model, tx, shardings, state


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _step_with_values(state, value):
    """A distinguishable state: step = value, every param = value."""
    return state.replace(step=jnp.int32(value),
                         params=jax.tree.map(lambda p: jnp.full_like(p, value), state.params))


def test_round_trip_restores_values_shardings_and_config(tmp_path, sharded):
    config, _, model, tx, shardings, state = sharded
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
    checkpointer.save(3, state, config)
    checkpointer.wait()
    restored, restored_config = checkpoint_lib.Checkpointer(str(tmp_path)).restore(
        state_lib.abstract_train_state(model, tx, shardings))
    _assert_trees_equal(state, restored)
    q = restored.params["blocks"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert restored_config.mesh.tensor == 4
    assert checkpoint_lib.config_to_json(restored_config) == checkpoint_lib.config_to_json(config)


def _pipeline(config):
    return iter(pipeline.build_dataset(config, CharTokenizer()))


@pytest.mark.parametrize("want_remainder", [True, False])
def test_data_iterator_resumes_on_the_next_batch(tmp_path, sharded, want_remainder):
    config = config_lib.default_config()
    config.train.update(batch_size=2, seq_len=16)
    iterator = _pipeline(config)
    # Stop where the concatenation buffer holds a partial document (remainder) or exactly at a
    # document boundary: grain marks the latter with a (-1, -1) slice, which JSON turns into a
    # list; both positions must resume exactly.
    for _ in range(500):
        next(iterator)
        slices = iterator.get_state()["remainder_slices"]["tokens"]
        if (tuple(slices) != (-1, -1)) == want_remainder:
            break
    else:
        pytest.fail("no such iterator position in 500 batches")
    _, _, model, tx, shardings, state = sharded
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
    checkpointer.save(1, state, config, iterator)
    checkpointer.wait()
    expected = [next(iterator)["tokens"] for _ in range(3)]
    fresh = _pipeline(config)
    checkpoint_lib.Checkpointer(str(tmp_path)).restore(
        state_lib.abstract_train_state(model, tx, shardings), fresh)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["tokens"], want)


class _FailingIterator(grain.DatasetIterator):
    """An input pipeline whose state cannot be read: the save dies half-way."""

    def __init__(self):
        super().__init__()

    def __next__(self):
        return {}

    def get_state(self):
        raise RuntimeError("simulated crash while saving")

    def set_state(self, state):
        raise AssertionError("never restored")


def test_interrupted_saves_are_never_restored(tmp_path, sharded):
    config, _, model, tx, shardings, state = sharded
    abstract = state_lib.abstract_train_state(model, tx, shardings)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
    checkpointer.save(3, _step_with_values(state, 3), config)
    checkpointer.wait()

    # 1. A save that crashes half-way leaves orbax's temporary directory behind; the failure is
    #    reported as a checkpoint write error naming the step and the cause.
    with pytest.raises(checkpoint_lib.CheckpointWriteError,
                       match=r"could not write checkpoint step 5 in .*simulated crash"):
        checkpointer.save(5, _step_with_values(state, 5), config, _FailingIterator())
        checkpointer.wait()
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))
    # 2. A complete-looking copy under a temporary name (killed before the rename).
    shutil.copytree(tmp_path / "3", tmp_path / "7.orbax-checkpoint-tmp-1234")
    # 3. A final name without the commit marker (object stores commit with the marker).
    shutil.copytree(tmp_path / "3", tmp_path / "9")
    os.remove(tmp_path / "9" / checkpoint_lib.COMMIT_MARKER)

    fresh = checkpoint_lib.Checkpointer(str(tmp_path))
    assert fresh.latest_step() == 3
    assert fresh.all_steps() == [3]
    restored, _ = fresh.restore(abstract)
    assert int(restored.step) == 3
    np.testing.assert_array_equal(np.asarray(restored.params["wte"]), 3.0)
    with pytest.raises(FileNotFoundError, match="step 9"):
        fresh.restore(abstract, step=9)
    _, params = checkpoint_lib.load_params(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(params["ln_f"]["scale"]), 3.0)

    # Saving again over the debris works, and the new step wins.
    fresh.save(11, _step_with_values(state, 11), config)
    fresh.wait()
    assert checkpoint_lib.Checkpointer(str(tmp_path)).latest_step() == 11


def test_load_params_from_workdir_and_params_only_dir(tmp_path, sharded):
    config, mesh, _, _, _, state = sharded
    workdir = tmp_path / "run"
    checkpointer = checkpoint_lib.Checkpointer(str(workdir / checkpoint_lib.CHECKPOINT_SUBDIR))
    for step in (2, 4):
        checkpointer.save(step, _step_with_values(state, step), config)
    checkpointer.wait()

    loaded_config, params = checkpoint_lib.load_params(str(workdir))  # latest: step 4
    assert loaded_config.mesh.tensor == 4
    np.testing.assert_array_equal(np.asarray(params["wte"]), 4.0)
    assert params["wte"].sharding.device_set == {jax.devices()[0]}  # no mesh: one device
    _, params_2 = checkpoint_lib.load_params(str(workdir), step=2, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(params_2["wte"]), 2.0)
    assert params_2["blocks"]["ff_out"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    with pytest.raises(FileNotFoundError, match="step 3"):
        checkpoint_lib.load_params(str(workdir), step=3)

    exported = tmp_path / "exported"
    checkpoint_lib.save_params(str(exported), loaded_config, params)
    config_again, params_again = checkpoint_lib.load_params(str(exported))
    assert checkpoint_lib.config_to_json(config_again) == \
        checkpoint_lib.config_to_json(loaded_config)
    _assert_trees_equal(params, params_again)
    with pytest.raises(FileExistsError):
        checkpoint_lib.save_params(str(exported), loaded_config, params)
    with pytest.raises(ValueError, match="params-only"):
        checkpoint_lib.load_params(str(exported), step=1)

    os.remove(exported / checkpoint_lib.CONFIG_FILE)
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint_lib.load_params(str(exported))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a params checkpoint"):
        checkpoint_lib.load_params(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoint_lib.load_params(str(tmp_path / "missing"))
