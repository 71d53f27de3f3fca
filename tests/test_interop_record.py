"""The conversion restructure (issue 13) changed no byte: tiny exports hash as before.

tests/data/interop_export_record.json holds the sha256 of every file of these exports as the
interop code on main before the restructure (commit 550668d) wrote them: shards byte for byte,
JSON files by their parsed content (the old LLaDA-V export re-wrote its index and config.json
without a final newline). The params are a fixed function of their seed, so the same exports
must hash the same today.
"""

import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.config import ModelConfig
from llada_jax.interop import hf, llada_v
from llada_jax.model.multimodal import LLaDAV
from llada_jax.model.transformer import Transformer
from llada_jax.model.vision import VisionConfig

RECORD = os.path.join(os.path.dirname(__file__), "data", "interop_export_record.json")
CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     mlp_hidden_size=48, mask_token_id=60, bos_token_id=59, eos_token_id=61,
                     pad_token_id=61, max_sequence_length=64)
VISION = VisionConfig(image_size=16, patch_size=4, width=32, n_layers=3, n_heads=4, mlp_dim=48)


def params_of(model, seed: int) -> dict:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                        nn.unbox(shapes["params"]))


def digest(directory) -> dict[str, str]:
    def content(name: str) -> bytes:
        data = (directory / name).read_bytes()
        if name.endswith(".json"):
            return json.dumps(json.loads(data), sort_keys=True).encode()
        return data
    return {n: hashlib.sha256(content(n)).hexdigest() for n in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def record() -> dict:
    with open(RECORD) as f:
        return json.load(f)


@pytest.mark.parametrize("naming", ["llada", "llama"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_language_tower_exports_hash_as_before(tmp_path, record, naming, dtype):
    hf.export_hf(params_of(Transformer(CONFIG), 0), CONFIG, str(tmp_path / "out"),
                 naming=naming, dtype=dtype, max_shard_bytes=20000)
    assert digest(tmp_path / "out") == record[f"{naming}_{dtype}"]


def test_llada_v_export_hashes_as_before(tmp_path, record):
    params = params_of(LLaDAV(CONFIG, VISION), 1)
    llada_v.export_llada_v(params, CONFIG, VISION, str(tmp_path / "out"), dtype="bfloat16",
                           image_aspect_ratio="square")
    assert digest(tmp_path / "out") == record["llada_v_bfloat16"]
