"""The trainer sets up once (issue 13): `trainer.prepare` starts distributed mode, loads and checks
the tokenizer, checks the config against the devices and builds the mesh and the rules; `train`
takes that setup, or makes it itself exactly once. Nothing here compiles or trains."""

import collections

import jax
import pytest

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.train import state as state_lib
from llada_jax.train import trainer


class _StopAfterSetup(Exception):
    pass


def _count_set_up_calls(monkeypatch) -> collections.Counter:
    calls = collections.Counter()

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counted(config_lib, "validate")
    counted(trainer, "load_tokenizer")
    for name in ("maybe_initialize_distributed", "validate_mesh", "make_mesh", "logical_rules"):
        counted(parallel, name)

    def stop(config):  # the first thing train builds after its set-up
        raise _StopAfterSetup
    monkeypatch.setattr(state_lib, "make_model", stop)
    return calls


def test_prepare_builds_what_the_config_says():
    c = config_lib.default_config()
    c.mesh.fsdp, c.mesh.tensor = 2, 4
    setup = trainer.prepare(c)
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 4}
    rules = dict(setup.rules)  # lists in the config -> tuples, as Linen takes them
    assert rules["batch"] == ("data", "fsdp", "expert") and rules["embed"] == "fsdp"
    assert rules["head_dim"] is None
    # The char tokenizer's ids are the default model's: mask 3, EOS 2, BOS 1.
    assert (setup.tokenizer.mask_id, setup.tokenizer.eos_id, setup.tokenizer.bos_id) == (3, 2, 1)


def test_prepare_errors_name_the_field():
    c = config_lib.default_config()
    c.model.mask_token_id = 5
    with pytest.raises(ValueError, match=r"^config.model.mask_token_id: expected 3 \(the id of "
                                         r"tokenizer 'char'\), found 5$"):
        trainer.prepare(c)
    c = config_lib.default_config()
    c.train.batch_size = 12
    with pytest.raises(ValueError, match=r"^config.train.batch_size: expected a multiple of "
                                         r"mesh.data \* mesh.fsdp \* train.grad_accum_steps = "
                                         r"1 \* 8 \* 1 = 8, found 12$"):
        trainer.prepare(c)
    assert trainer.prepare(c, jax.devices()[:4]).mesh.shape["fsdp"] == 4  # 12 rows over 4


def test_train_sets_up_exactly_once(monkeypatch, tmp_path):
    c = config_lib.default_config()
    calls = _count_set_up_calls(monkeypatch)
    with pytest.raises(_StopAfterSetup):
        trainer.train(c, str(tmp_path))
    assert calls == {"validate": 1, "load_tokenizer": 1, "maybe_initialize_distributed": 1,
                     "validate_mesh": 1, "make_mesh": 1, "logical_rules": 1}


def test_train_with_a_setup_sets_up_nothing_again(monkeypatch, tmp_path):
    c = config_lib.default_config()
    setup = trainer.prepare(c)
    calls = _count_set_up_calls(monkeypatch)
    with pytest.raises(_StopAfterSetup):
        trainer.train(c, str(tmp_path), setup=setup)
    assert calls == {}
    with pytest.raises(TypeError, match="devices or setup, not both"):
        trainer.train(c, str(tmp_path), setup=setup, devices=jax.devices())
