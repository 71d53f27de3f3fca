"""The config sections are derived from their dataclass schemas (issue 13): one definition per
field, the section defaults as they were before the move, and the way back to the dataclass."""

import dataclasses
import subprocess
import sys

import pytest

from llada_jax import config as config_lib
from llada_jax.config import ModelConfig, SamplerConfig, VisionConfig

# The `sampler` and `vision` sections of default_config() on main before the schemas moved
# (written out by hand from that commit's config.py).
SAMPLER_SECTION_BEFORE = {
    "gen_length": 32, "block_length": 32, "steps": 32, "temperature": 0.0, "cfg_scale": 0.0,
    "remasking": "low_confidence", "logits_eos_inf": False, "confidence_eos_eot_inf": False,
    "eot_token_id": -1, "seed": 0, "cache": "none", "refresh_every": 0, "threshold": 0.0,
    "factor": 0.0, "early_exit": False, "banned_ids": [], "stop_at_eot": False}
VISION_SECTION_BEFORE = {
    "enabled": False, "image_size": 384, "patch_size": 14, "width": 1152, "n_layers": 27,
    "n_heads": 16, "mlp_dim": 4304, "layer_norm_eps": 1e-6, "feature_layer": -2,
    "use_post_layernorm": False, "dtype": "float32", "param_dtype": "float32",
    "remat_policy": "none", "image_aspect_ratio": "anyres_max_4", "max_grid": 6,
    "max_views": 37}


def _typed(section):
    return {k: (type(v), v) for k, v in section.items()}


def test_section_defaults_are_what_they_were():
    c = config_lib.default_config()
    # Types too: a flag override is cast to the type of the default (1 -> 1.0 for a float).
    assert _typed(c.sampler.to_dict()) == _typed(SAMPLER_SECTION_BEFORE)
    assert _typed(c.vision.to_dict()) == _typed(VISION_SECTION_BEFORE)


@pytest.mark.parametrize("schema,section,extra", [
    (ModelConfig, "model", set()),
    (SamplerConfig, "sampler", {"eot_token_id", "seed"}),
    (VisionConfig, "vision", {"enabled", "image_aspect_ratio", "max_grid", "max_views"}),
])
def test_every_schema_field_is_a_section_field(schema, section, extra):
    """A field added to a dataclass appears in its section; the ids the sampler gets from the
    model and the tokenizer, and the tower's pixel channels, are not config fields."""
    in_section = {f.name for f in dataclasses.fields(schema)} - {
        "mask_id", "eos_id", "eot_id", "vocab_limit", "num_channels"}
    assert set(config_lib.default_config()[section]) == in_section | extra


def test_dataclass_defaults_are_the_official_ones():
    # LLaDA's generate.py: 128 tokens in 128 steps, blocks of 32; the tiny default config
    # generates 32 tokens in 32 steps.
    s = SamplerConfig()
    assert (s.gen_length, s.steps, s.block_length) == (128, 128, 32)
    assert (s.mask_id, s.eos_id, s.eot_id) == (126336, 126081, 126348)
    assert VisionConfig().num_patches == 27 * 27 and VisionConfig().num_channels == 3


def test_sampler_config_from_a_config_section():
    c = config_lib.default_config()
    c.sampler.update(temperature=1, banned_ids=[5, 6], cache="prefix")  # 1: an int from a flag
    s = SamplerConfig.from_config(c)
    assert s.temperature == 1.0 and isinstance(s.temperature, float)
    assert s.banned_ids == (5, 6) and s.cache == "prefix" and s.gen_length == 32
    # The ids come from the model section; the EoT id from the section, else the tokenizer's.
    assert (s.mask_id, s.eos_id, s.eot_id, s.vocab_limit) == (3, 2, -1, 0)
    assert SamplerConfig.from_config(c, eot_id=7).eot_id == 7
    c.sampler.eot_token_id = 9
    assert SamplerConfig.from_config(c, eot_id=7).eot_id == 9
    assert SamplerConfig.from_config(c, steps=16).steps == 16
    c.sampler.steps = 0
    with pytest.raises(ValueError, match=r"^config.sampler.steps: expected a positive multiple"):
        SamplerConfig.from_config(c)


def test_vision_config_from_a_config_section():
    c = config_lib.default_config()
    assert config_lib.vision_config(c) is None
    c.vision.update(enabled=True, image_size=32, patch_size=8, width=64, n_heads=4)
    v = config_lib.vision_config(c)
    assert (v.image_size, v.patch_size, v.width, v.n_heads, v.num_channels) == (32, 8, 64, 4, 3)
    assert v.num_patches == 16
    c.vision.n_heads = 5
    with pytest.raises(ValueError, match=r"^config.vision: vision config field n_heads: "
                                         r"expected a divisor of width=64, found 5$"):
        config_lib.validate(c)


def test_old_import_paths_still_work():
    from llada_jax.diffusion.sampler import SamplerConfig as FromSampler
    from llada_jax.model.vision import VisionConfig as FromVision
    from llada_jax.model.vision import validate_vision

    assert FromSampler is SamplerConfig and FromVision is VisionConfig
    with pytest.raises(ValueError, match="vision config field width"):
        validate_vision(VisionConfig(width=0))


def test_trainable_groups():
    assert config_lib.parse_trainable("all") == ("vision_tower", "projector", "language_model")
    assert config_lib.parse_trainable(" projector,vision_tower") == ("projector", "vision_tower")
    with pytest.raises(ValueError, match=r"^config.train.trainable: expected 'all' or distinct "
                                         r"names among"):
        config_lib.parse_trainable("projector,projector")


def test_validation_needs_neither_jax_nor_the_data_or_model_layers():
    """`launch/train.py` validates before JAX is imported, so config errors are instant."""
    code = ("import sys; from llada_jax import config as c; c.validate(c.default_config()); "
            "print(sorted(m for m in sys.modules if m == 'jax' or "
            "m.startswith(('llada_jax.data', 'llada_jax.model', 'llada_jax.parallel'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
