"""Config errors a user can cause name what the user set (issue 12): mesh axes, new fields.
The config sections derived from their dataclass schemas (issue 13)."""


import pytest

from llada_jax import config as config_lib
from llada_jax import parallel


def _mesh(data, fsdp, tensor):
    c = config_lib.default_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    return c


@pytest.mark.parametrize("axes,devices,expected", [
    ((1, -1, 1), 8, (1, 8, 1, 1)),
    ((2, -1, 2), 8, (2, 2, 1, 2)),
    ((-1, 2, 1), 8, (4, 2, 1, 1)),
    ((2, 2, 2), 8, (2, 2, 1, 2)),
])
def test_mesh_shape_fills_the_minus_one_axis(axes, devices, expected):
    assert parallel.mesh_shape(_mesh(*axes).mesh, devices) == expected


def test_expert_axis_fills_and_is_named_when_set():
    c = _mesh(1, -1, 1)
    c.mesh.expert = 4
    assert parallel.mesh_shape(c.mesh, 8) == (1, 2, 4, 1)
    c.mesh.expert = 3
    with pytest.raises(ValueError, match=r"^config.mesh: data=1 \* expert=3 \* tensor=1 = 3 "
                                         r"does not divide the 8 devices"):
        parallel.mesh_shape(c.mesh, 8)
    c.mesh.expert, c.train.batch_size = 2, 12
    with pytest.raises(ValueError, match=r"mesh.data \* mesh.fsdp \* mesh.expert \* "
                                         r"train.grad_accum_steps = 1 \* 4 \* 2 \* 1 = 8, "
                                         r"found 12$"):
        parallel.validate_mesh(c, 8)


@pytest.mark.parametrize("axes,message", [
    # The user set mesh.data (fsdp is -1 by default): the message names data and its value.
    # Before: "config.mesh.fsdp: expected a fill of 8 devices ...".
    ((3, -1, 1), "config.mesh: data=3 * tensor=1 = 3 does not divide the 8 devices "
                 "(mesh.fsdp=-1 takes the rest); found mesh.data=3, mesh.fsdp=-1, mesh.tensor=1"),
    ((1, -1, 3), "config.mesh: data=1 * tensor=3 = 3 does not divide the 8 devices"),
    # Two -1 axes: both named with their values. Before: "config.mesh.fsdp: expected at most
    # one mesh axis set to -1, found -1" after the user typed --config.mesh.data=-1.
    ((-1, -1, 1), "config.mesh: at most one axis may be -1 (take the devices left over), found "
                  "mesh.data=-1, mesh.fsdp=-1, mesh.tensor=1"),
    ((1, 1, 3), "config.mesh: data * fsdp * tensor = 3 must equal the 8 devices; found "
                "mesh.data=1, mesh.fsdp=1, mesh.tensor=3"),
    ((0, -1, 1), "config.mesh.data: expected a positive integer or -1, found 0"),
    ((1, -1, True), "config.mesh.tensor: expected a positive integer or -1, found True"),
])
def test_mesh_errors_name_the_axes_the_user_set(axes, message):
    with pytest.raises(ValueError) as caught:
        parallel.mesh_shape(_mesh(*axes).mesh, 8)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_batch_size_error_shows_the_mesh_product():
    c = _mesh(2, -1, 1)
    c.train.batch_size = 6
    with pytest.raises(ValueError, match=r"^config.train.batch_size: expected a multiple of "
                                         r"mesh.data \* mesh.fsdp \* train.grad_accum_steps = "
                                         r"2 \* 4 \* 1 = 8, found 6$"):
        parallel.validate_mesh(c, 8)


def test_max_bad_steps_is_validated():
    c = config_lib.default_config()
    c.train.max_bad_steps = -1
    with pytest.raises(ValueError, match=r"^config.train.max_bad_steps: expected an integer >= 0"):
        config_lib.validate(c)


@pytest.mark.parametrize("seed", [-1, 2**32])  # (ConfigDict refuses non-ints itself)
def test_train_seed_is_validated(seed):
    c = config_lib.default_config()
    c.train.seed = seed
    with pytest.raises(ValueError, match=r"^config.train.seed: expected an integer in "
                                         r"\[0, 2\*\*32\), found"):
        config_lib.validate(c)
    c.train.seed = 2**32 - 1   # the largest accepted
    config_lib.validate(c)


def test_moe_fields_against_the_mesh_and_weights():
    from llada_jax import parallel

    c = _mesh(1, -1, 1)
    c.model.update(num_experts=6, experts_per_token=2, expert_mlp_hidden_size=32)
    c.mesh.expert = 4
    with pytest.raises(ValueError, match=r"^config.model.num_experts: expected a multiple of "
                                         r"mesh.expert=4, found 6$"):
        parallel.validate_mesh(c, 8)
    c.model.num_experts, c.mesh.expert, c.mesh.tensor = 8, 2, 2
    c.model.expert_mlp_hidden_size = 33
    with pytest.raises(ValueError, match=r"^config.model.expert_mlp_hidden_size: expected a "
                                         r"multiple of mesh.tensor=2, found 33$"):
        parallel.validate_mesh(c, 8)
    c = config_lib.default_config()
    c.train.moe_z_loss_weight = -0.1
    with pytest.raises(ValueError, match=r"^config.train.moe_z_loss_weight: expected a number "
                                         r">= 0, found -0.1$"):
        config_lib.validate(c)



def test_rule_tables_name_the_first_bad_field_in_check_order():
    """Fields are checked in a fixed order (sizes, then rates), so with two bad fields the error
    names the one checked first; fixing it reveals the next."""
    c = config_lib.default_config()
    c.train.steps, c.train.learning_rate = 0, -1.0
    with pytest.raises(ValueError, match=r"^config.train.steps: expected a positive integer, "
                                         r"found 0$"):
        config_lib.validate(c)
    c.train.steps = 10
    with pytest.raises(ValueError, match=r"^config.train.learning_rate: expected a positive "
                                         r"number, found -1.0$"):
        config_lib.validate(c)


@pytest.mark.parametrize("field,value,expected", [
    ("pack_bins", 0, "a positive integer"),
    ("num_workers", -1, "an integer >= 0"),
    ("packing", "zip", "one of ('concat', 'pack')"),
])
def test_data_section_errors_name_the_field(field, value, expected):
    from llada_jax.data import validation

    c = config_lib.default_config()
    c.data[field] = value
    with pytest.raises(ValueError) as caught:
        validation.check(c)
    assert str(caught.value) == f"config.data.{field}: expected {expected}, found {value!r}"
