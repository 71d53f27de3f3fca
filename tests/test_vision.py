"""The SigLIP vision tower (llada_jax/model/vision.py) and its weight import (interop/siglip.py).

Parity is against transformers' `SiglipVisionModel`, the class the fixed-resolution SigLIP2
so400m/14-384 checkpoint loads as (`model_type: siglip`; LLaDA-V's own tower is a copy of the
same architecture). `Siglip2VisionModel` is the NaFlex variant and is not the reference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES
from llada_jax.interop import siglip
from llada_jax.model.vision import (
    VisionConfig,
    VisionEncoder,
    validate_vision,
)
from tests.interop_helpers import import_vision_from_safetensors, split_vision_keys

TINY = {"image_size": 16, "patch_size": 4, "width": 32, "n_layers": 3, "n_heads": 4,
        "mlp_dim": 48}
FULL = VisionConfig(**TINY, feature_layer=-1, use_post_layernorm=True)   # = last_hidden_state
LLADA_V = VisionConfig(**TINY)                                           # penultimate, no post-LN


@pytest.fixture(scope="module")
def torch_tower():
    """A tiny random SiglipVisionModel (every parameter randomised, LayerNorms included), its
    state dict as numpy, an input batch and its outputs."""
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, image_size=16, patch_size=4,
                                vision_use_head=False)
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        pixels = torch.rand(2, 3, 16, 16) * 2 - 1
        out = model(pixel_values=pixels, output_hidden_states=True)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, state, pixels, out


def _nhwc(pixels: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("cfg,which", [(FULL, "last_hidden_state"), (LLADA_V, "penultimate")])
def test_matches_transformers(torch_tower, cfg, which):
    _, state, pixels, out = torch_tower
    reference = out.last_hidden_state if which == "last_hidden_state" else out.hidden_states[-2]
    params = siglip.import_vision(state, cfg)
    features = VisionEncoder(cfg).apply({"params": params}, _nhwc(pixels))
    assert features.shape == (2, 16, 32)
    np.testing.assert_allclose(np.asarray(features), reference.numpy(), rtol=1e-5, atol=1e-5)


def test_image_size_not_a_multiple_of_patch():
    """384 = 27 * 14 + 6: the reference's "valid" conv ignores the remainder pixels. Same here
    with 18 = 4 * 4 + 2 (the last 2 rows/columns are changed and must not matter)."""
    torch.manual_seed(1)
    config = SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=2, image_size=18, patch_size=4,
                                vision_use_head=False)
    model = SiglipVisionModel(config).eval()
    pixels = torch.rand(1, 3, 18, 18)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        reference = model(pixel_values=pixels).last_hidden_state.numpy()
    cfg = VisionConfig(image_size=18, patch_size=4, width=16, n_layers=2, n_heads=2, mlp_dim=24,
                       feature_layer=-1, use_post_layernorm=True)
    params = siglip.import_vision({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    x = np.array(_nhwc(pixels))
    x[:, 16:, :, :] = 5.0
    x[:, :, 16:, :] = -5.0
    features = VisionEncoder(cfg).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(features), reference, rtol=1e-5, atol=1e-5)


def test_llada_v_truncated_tower_checkpoint(torch_tower):
    """LLaDA-V deletes the last encoder layer and reads hidden_states[-1]; its checkpoint holds
    n-1 layers and the (unused) post-layernorm under model.vision_tower.vision_tower.vision_model."""
    _, state, pixels, out = torch_tower
    truncated = {siglip.LLADA_V_VISION_PREFIX + k: v for k, v in state.items()
                 if not k.startswith("encoder.layers.2.")}
    truncated["model.layers.0.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)  # LM: ignored
    params = siglip.import_vision(truncated, LLADA_V)              # prefix detected
    features = VisionEncoder(LLADA_V).apply({"params": params}, _nhwc(pixels))
    # The reference's features: the output of block 2 of 3 = hidden_states[2] (0 = embeddings).
    np.testing.assert_allclose(np.asarray(features), out.hidden_states[2].numpy(),
                               rtol=1e-5, atol=1e-5)


def test_export_import_roundtrip_exact(torch_tower):
    _, state, _, _ = torch_tower
    back = siglip.export_vision(siglip.import_vision(state, FULL), FULL, prefix="")
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    # The LLaDA-V config keeps everything but the last layer and the post-layernorm.
    used, skipped, unexpected = split_vision_keys(state, LLADA_V, "")
    assert unexpected == []
    assert sorted(skipped) == sorted(k for k in state if k.startswith(
        ("encoder.layers.2.", "post_layernorm.")))
    back = siglip.export_vision(siglip.import_vision(state, LLADA_V), LLADA_V,
                                prefix=siglip.LLADA_V_VISION_PREFIX)
    assert sorted(back) == sorted(siglip.LLADA_V_VISION_PREFIX + k for k in used)
    for name in used:
        assert np.array_equal(back[siglip.LLADA_V_VISION_PREFIX + name], state[name])


def test_imported_tree_matches_module_params(torch_tower):
    _, state, _, _ = torch_tower
    for cfg in (FULL, LLADA_V):
        abstract = jax.eval_shape(VisionEncoder(cfg).init, jax.random.key(0),
                                  jnp.zeros((1, 16, 16, 3)))
        expected = jax.tree.map(lambda x: x.shape, nn.unbox(abstract["params"]))
        got = jax.tree.map(lambda x: x.shape, siglip.import_vision(state, cfg))
        assert got == expected


def test_import_errors(torch_tower):
    _, state, _, _ = torch_tower
    missing = dict(state)
    del missing["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\).*encoder\.layers\.1\.mlp\.fc2\.bias"):
        siglip.import_vision(missing, FULL)

    wrong = dict(state)
    wrong["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.q_proj\.weight: "
                                         r"expected shape \(32, 32\).*found \(32, 31\)"):
        siglip.import_vision(wrong, FULL)

    extra = dict(state)
    extra["encoder.layers.7.layer_norm1.weight"] = np.zeros(32, np.float32)   # beyond n_layers
    extra["embeddings.something.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*embeddings\.something\.weight"
                                         r".*encoder\.layers\.7\.layer_norm1\.weight"):
        siglip.import_vision(extra, FULL)

    with pytest.raises(ValueError, match="no SigLIP vision tower found"):
        siglip.import_vision({"model.embed_tokens.weight": np.zeros(2)}, FULL)

    # The pooling head is skipped, not an error.
    with_head = dict(state, **{"head.probe": np.zeros((1, 1, 32), np.float32)})
    siglip.import_vision(with_head, FULL)

    params = siglip.import_vision(state, FULL)
    with pytest.raises(ValueError, match="expected 2 stacked layers, found 3"):
        siglip.export_vision(params, LLADA_V)


def test_safetensors_directory_bf16(torch_tower, tmp_path):
    """A sharded LLaDA-V-style checkpoint in bfloat16 (the released dtype) with a language-model
    tensor besides: only the vision tensors are read; values are the bf16-rounded ones."""
    from safetensors.torch import save_file

    _, state, _, _ = torch_tower
    named = {siglip.LLADA_V_VISION_PREFIX + k: torch.from_numpy(v).to(torch.bfloat16)
             for k, v in state.items()}
    names = sorted(named)
    save_file({k: named[k] for k in names[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    rest = {k: named[k] for k in names[1::2]}
    rest["model.layers.0.self_attn.q_proj.weight"] = torch.ones(4, 4, dtype=torch.bfloat16)
    save_file(rest, str(tmp_path / "model-00002-of-00002.safetensors"))

    params = import_vision_from_safetensors(tmp_path, FULL)
    rounded = {k: named[siglip.LLADA_V_VISION_PREFIX + k].float().numpy() for k in state}
    expected = siglip.import_vision(rounded, FULL)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert jax.tree.leaves(params)[0].dtype == np.float32
    as_bf16 = import_vision_from_safetensors(tmp_path, FULL, dtype="bfloat16")
    assert jax.tree.leaves(as_bf16)[0].dtype == jnp.bfloat16

    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        import_vision_from_safetensors(tmp_path / "nothing", FULL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors file"):
        import_vision_from_safetensors(tmp_path / "empty", FULL)


def test_remat_and_bf16(torch_tower):
    _, state, pixels, out = torch_tower
    params = siglip.import_vision(state, FULL)
    x = _nhwc(pixels)
    remat_cfg = VisionConfig(**TINY, feature_layer=-1, use_post_layernorm=True,
                             remat_policy="save_dots")

    def value_and_grad(cfg):
        def loss(p):
            y = VisionEncoder(cfg).apply({"params": p}, x)
            return jnp.sum(y ** 2), y
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, plain), g_plain = value_and_grad(FULL)
    (_, remat), g_remat = value_and_grad(remat_cfg)
    np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 g_plain, g_remat)

    bf16 = VisionConfig(**TINY, feature_layer=-1, use_post_layernorm=True, dtype="bfloat16")
    y = jax.jit(VisionEncoder(bf16).apply)({"params": params}, x)
    assert y.dtype == jnp.bfloat16
    # bf16 has 8 bits of mantissa: a few percent of the activations' scale.
    np.testing.assert_allclose(np.asarray(y, np.float32), out.last_hidden_state.numpy(),
                               atol=0.15)


def test_logical_axes_and_fsdp_sharding():
    model = VisionEncoder(LLADA_V)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    specs = nn.get_partition_spec(abstract)["params"]
    assert specs["embeddings"]["kernel"] == jax.sharding.PartitionSpec(
        "patch_h", "patch_w", "channels", "embed")
    assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim")
    assert specs["layers"]["self_attn"]["out_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "heads", "head_dim", "embed")
    assert specs["layers"]["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "mlp")
    assert specs["layers"]["layer_norm1"]["scale"] == jax.sharding.PartitionSpec("layers", "norm")

    # Initialise sharded over every device on the fsdp axis with the default rule table.
    devices = jax.devices()
    mesh = jax.make_mesh((1, len(devices), 1, 1), ("data", "fsdp", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                            DEFAULT_LOGICAL_AXIS_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
        variables = jax.jit(model.init, out_shardings=shardings)(
            jax.random.key(0), jnp.zeros((len(devices), 16, 16, 3)))
    q = nn.unbox(variables)["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == len(devices)


def test_so400m_param_count_by_eval_shape():
    """Width W = 1152, MLP M = 4304, patch p = 14, 3 channels, 27*27 = 729 positions.

    embeddings = p*p*3*W + W (patch kernel + bias) + 729*W (positions)
               = 677376 + 1152 + 839808 = 1518336
    per layer  = 2*2W (two LayerNorms) + 4*(W*W + W) (q, k, v, out with biases)
                 + (W*M + M) + (M*W + W) (fc1, fc2) = 4W^2 + 2WM + 9W + M
               = 5308416 + 9916416 + 10368 + 4304 = 15239504
    LLaDA-V (26 layers, no post-LN):  1518336 + 26 * 15239504        = 397745440
    full (27 layers + post-LN 2W):    1518336 + 27 * 15239504 + 2304 = 412987248
    (plus the 15.2M attention-pooling head that neither uses: the "so400m" ~428M.)
    """
    # VisionConfig's defaults are SigLIP2 so400m/14 at 384 px as LLaDA-V uses it.
    for cfg, expected in ((VisionConfig(), 397_745_440),
                          (VisionConfig(feature_layer=-1, use_post_layernorm=True),
                           412_987_248)):
        abstract = jax.eval_shape(VisionEncoder(cfg).init, jax.random.key(0),
                                  jnp.zeros((1, 384, 384, 3)))
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract)))
        assert count == expected == cfg.num_params
        out = jax.eval_shape(VisionEncoder(cfg).apply, abstract, jnp.zeros((2, 384, 384, 3)))
        assert out.shape == (2, 729, 1152)
    assert VisionConfig().num_layers_used == 26


@pytest.mark.parametrize("field,value", [
    ("width", 0), ("n_heads", 5), ("patch_size", 17), ("feature_layer", 0),
    ("feature_layer", -4), ("feature_layer", 4), ("dtype", "float64"),
    ("param_dtype", "int8"), ("remat_policy", "sometimes"), ("layer_norm_eps", 0.0),
])
def test_validate_vision_names_field(field, value):
    cfg = VisionConfig(**{**TINY, field: value})
    with pytest.raises(ValueError, match=f"field {field}"):
        validate_vision(cfg)


def test_wrong_pixel_shape():
    with pytest.raises(ValueError, match=r"expected pixels of shape \[batch, 16, 16, 3\]"):
        VisionEncoder(LLADA_V).init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)))
