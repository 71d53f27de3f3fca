"""The mask predictor against numpy formulas and the independent PyTorch reference."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llada_jax.config import ModelConfig, default_config, model_config, validate
from llada_jax.model.layers import RMSNorm, rotary_embedding
from llada_jax.model.transformer import KVCache, Transformer
from llada_jax.parallel import validate_mesh
from tests.torch_reference import RefConfig, random_reference


def test_rmsnorm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    scale = np.linspace(0.5, 1.5, 8).astype(np.float32)
    out = RMSNorm(eps=1e-5).apply({"params": {"scale": scale}}, x)
    expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)


def test_rotary_rotate_half_matches_numpy():
    rng = np.random.default_rng(1)
    b, length, h, d, theta = 2, 5, 3, 8, 10000.0
    x = rng.normal(size=(b, length, h, d)).astype(np.float32)
    positions = np.stack([np.arange(length), np.arange(length) + 7])
    out = np.asarray(rotary_embedding(jnp.asarray(x), jnp.asarray(positions), theta))
    expected = np.empty_like(x)
    half = d // 2
    for bi in range(b):
        for t in range(length):
            for i in range(half):
                angle = positions[bi, t] * theta ** (-2.0 * i / d)
                c, s = np.cos(angle), np.sin(angle)
                x1, x2 = x[bi, t, :, i], x[bi, t, :, i + half]
                expected[bi, t, :, i] = x1 * c - x2 * s
                expected[bi, t, :, i + half] = x2 * c + x1 * s
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def params_from_reference(ref, c: ModelConfig) -> dict:
    """Our scanned param tree from the reference's state dict (written here, independently)."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    p = "model.transformer."
    layers = range(c.n_layers)

    def stack(name, fn):
        return np.stack([fn(sd[f"{p}blocks.{i}.{name}.weight"]) for i in layers])

    def heads_in(w, n):  # [n*hd, d] -> [d, n, hd]
        return w.T.reshape(c.d_model, n, c.head_dim)

    return {
        "wte": sd[p + "wte.weight"],
        "ln_f": {"scale": sd[p + "ln_f.weight"]},
        "lm_head": {"kernel": sd[p + "ff_out.weight"].T},
        "blocks": {
            "attn_norm": {"scale": stack("attn_norm", lambda w: w)},
            "ff_norm": {"scale": stack("ff_norm", lambda w: w)},
            "attn": {
                "q_proj": {"kernel": stack("q_proj", lambda w: heads_in(w, c.n_heads))},
                "k_proj": {"kernel": stack("k_proj", lambda w: heads_in(w, c.n_kv_heads))},
                "v_proj": {"kernel": stack("v_proj", lambda w: heads_in(w, c.n_kv_heads))},
                "attn_out": {"kernel": stack(
                    "attn_out", lambda w: w.T.reshape(c.n_heads, c.head_dim, c.d_model))},
            },
            "ff_proj": {"kernel": stack("ff_proj", lambda w: w.T)},
            "up_proj": {"kernel": stack("up_proj", lambda w: w.T)},
            "ff_out": {"kernel": stack("ff_out", lambda w: w.T)},
        },
    }


def tiny(n_heads=4, n_kv_heads=4, **kw) -> ModelConfig:
    base = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=n_heads, n_kv_heads=n_kv_heads,
                head_dim=32 // n_heads, mlp_hidden_size=48, rope_theta=500000.0,
                max_sequence_length=64, mask_token_id=5, eos_token_id=2, bos_token_id=1,
                pad_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


@functools.cache
def tiny_variables(seed: int = 0) -> dict:
    """`Transformer(tiny()).init` with key `seed`, run once for the tests that share it. The
    values do not depend on the tokens init runs on (the parameter shapes come from the config
    and every initialiser draws from the key alone), so this is what each test's own init gave."""
    return Transformer(tiny()).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_logits_match_torch_reference(n_kv_heads):
    c = tiny(n_kv_heads=n_kv_heads)
    ref = random_reference(RefConfig(c.vocab_size, c.d_model, c.n_layers, c.n_heads, n_kv_heads,
                                     c.mlp_hidden_size, c.rope_theta, c.rms_norm_eps), seed=3)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, size=(2, 11))
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens)).numpy()
    params = params_from_reference(ref, c)
    # Shapes must agree with what the module itself creates.
    created = nn.unbox(jax.eval_shape(lambda: Transformer(c).init(jax.random.key(0), tokens)))
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), created["params"],
                 params)
    logits = Transformer(c).apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-5, atol=2e-5)


def test_key_padding_mask_matches_reference_and_ignores_padded_keys():
    c = tiny()
    ref = random_reference(RefConfig(c.vocab_size, c.d_model, c.n_layers, c.n_heads,
                                     c.n_kv_heads, c.mlp_hidden_size, c.rope_theta), seed=4)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, c.vocab_size, size=(2, 9))
    key_mask = np.ones((2, 9), bool)
    key_mask[0, :3] = False  # left padding of row 0
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens), torch.from_numpy(key_mask)).numpy()
    params = params_from_reference(ref, c)
    model = Transformer(c)
    logits = model.apply({"params": params}, jnp.asarray(tokens),
                         attention_mask=jnp.asarray(key_mask))
    np.testing.assert_allclose(np.asarray(logits)[key_mask], expected[key_mask], atol=2e-5)
    # Changing the tokens behind the mask changes nothing for the unmasked queries.
    other = tokens.copy()
    other[0, :3] = (other[0, :3] + 1) % c.vocab_size
    logits2 = model.apply({"params": params}, jnp.asarray(other),
                          attention_mask=jnp.asarray(key_mask))
    np.testing.assert_allclose(np.asarray(logits2)[0, 3:], np.asarray(logits)[0, 3:], atol=1e-6)


def test_segment_ids_keep_documents_apart():
    c = tiny()
    model = Transformer(c)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, c.vocab_size, size=(1, 10)))
    params = tiny_variables()
    segments = jnp.asarray([[1] * 4 + [2] * 6])
    packed = model.apply(params, tokens, segment_ids=segments)
    first = model.apply(params, tokens[:, :4])
    second = model.apply(params, tokens[:, 4:], positions=jnp.arange(4, 10)[None])
    np.testing.assert_allclose(packed[:, :4], first, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:], second, atol=1e-5)


def test_window_with_kv_cache_equals_full_pass():
    c = tiny(n_kv_heads=2)
    model = Transformer(c)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, c.vocab_size, size=(2, 12)))
    params = model.init(jax.random.key(1), tokens)
    full, kv = model.apply(params, tokens, return_kv=True)
    assert kv.k.shape == (c.n_layers, 2, 12, c.n_kv_heads, c.head_dim)
    window, window_kv = model.apply(params, tokens[:, 5:9], kv_cache=kv, cache_index=5,
                                    return_kv=True)
    np.testing.assert_allclose(window, full[:, 5:9], atol=1e-5)
    np.testing.assert_allclose(window_kv.k, kv.k[:, :, 5:9], atol=1e-6)
    # A stale cache entry inside the window is overwritten by the window's fresh keys.
    stale = KVCache(kv.k.at[:, :, 6].set(9.0), kv.v.at[:, :, 6].set(9.0))
    window2 = model.apply(params, tokens[:, 5:9], kv_cache=stale, cache_index=5)
    np.testing.assert_allclose(window2, full[:, 5:9], atol=1e-5)


def test_embeddings_input_equals_token_input():
    c = tiny()
    model = Transformer(c)
    tokens = jnp.asarray([[1, 2, 3, 4]])
    params = tiny_variables()
    embeds = model.apply(params, tokens, method=Transformer.embed)
    np.testing.assert_allclose(model.apply(params, inputs_embeds=embeds),
                               model.apply(params, tokens), atol=1e-6)


def test_remat_policies_give_same_gradients():
    c = tiny()
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    params = tiny_variables()

    def loss(p, cfg):
        return jnp.mean(Transformer(cfg).apply(p, tokens) ** 2)

    # The gradients without remat are computed once and compared with every policy's.
    g_plain = jax.grad(loss)(params, c)
    for policy in ("full", "save_dots", "save_attention_out"):
        g_remat = jax.grad(loss)(params, dataclasses.replace(c, remat_policy=policy))
        jax.tree.map(lambda a, b, p=policy: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-7, err_msg=f"remat_policy={p}"), g_plain, g_remat)


def test_llada_8b_parameter_count_without_allocating():
    c = ModelConfig()  # the defaults are LLaDA-8B (REFERENCE.md section 1)
    shapes = jax.eval_shape(lambda: Transformer(c).init(jax.random.key(0),
                                                        jnp.zeros((1, 8), jnp.int32)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    # 32 * (4 * 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096) + 2 * 126464 * 4096 + 4096
    assert count == 8_015_581_184
    assert c.num_params == 8_015_581_184
    assert 2 * count == 16_031_162_368  # bf16 bytes of the released checkpoint


@pytest.mark.parametrize("field,value,message", [
    ("model.n_kv_heads", 3, "config.model.n_kv_heads"),
    ("model.remat_policy", "sometimes", "config.model.remat_policy"),
    ("model.attention_backend", "magic", "config.model.attention_backend"),
    ("model.mask_token_id", 999, "config.model.mask_token_id"),
    ("train.seq_len", 4096, "config.train.seq_len"),
    ("sampler.block_length", 5, "config.sampler.block_length"),
    ("sampler.steps", 3, "config.sampler.steps"),
])
def test_bad_config_names_the_field(field, value, message):
    config = default_config()
    section, name = field.split(".")
    if field == "sampler.steps":
        config.sampler.block_length = 16  # 2 blocks: 3 steps do not divide
    config[section][name] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate(config)


def test_mesh_product_must_equal_device_count():
    config = default_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 3
    with pytest.raises(ValueError, match="config.mesh"):
        validate_mesh(config, 8)
    config.mesh.fsdp = -1
    config.mesh.tensor = 3
    # The axes the user set are named with their values (not only the fsdp fill).
    with pytest.raises(ValueError, match=r"config.mesh: data=2 \* tensor=3 = 6 does not divide "
                                         r"the 8 devices.*mesh.tensor=3"):
        validate_mesh(config, 8)


def test_unknown_model_field_is_an_error():
    config = default_config()
    config.model.unlock()
    config.model.n_experts = 4
    with pytest.raises(ValueError, match="n_experts"):
        model_config(config)


def test_splash_backend_matches_xla_with_padding_segments_and_gqa():
    """The TPU splash kernel (Pallas interpret mode on CPU) gives the xla backend's logits."""
    c = tiny(n_kv_heads=2, max_sequence_length=128)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, c.vocab_size, size=(2, 128)))
    key_mask = jnp.ones((2, 128), bool).at[0, :17].set(False)
    segments = jnp.asarray(np.repeat([[1, 2], [1, 1]], 64, axis=1))
    params = Transformer(c).init(jax.random.key(0), tokens)
    splash = dataclasses.replace(c, attention_backend="splash")
    for kwargs in ({"attention_mask": key_mask}, {"segment_ids": segments}):
        expected = Transformer(c).apply(params, tokens, **kwargs)
        got = Transformer(splash).apply(params, tokens, **kwargs)
        valid = np.asarray(key_mask) if "attention_mask" in kwargs else np.ones((2, 128), bool)
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid],
                                   atol=2e-5)


def test_splash_backend_rejects_unaligned_lengths():
    c = tiny(attention_backend="splash")
    tokens = jnp.zeros((1, 20), jnp.int32)
    with pytest.raises(ValueError, match="multiples of 128, found 20"):
        Transformer(c).init(jax.random.key(0), tokens)


def test_hidden_states_then_lm_head_equal_logits():
    """`return_hidden` + `logits_from_hidden` is the same computation as the logits call."""
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_hidden_size=48, max_sequence_length=16, mask_token_id=63)
    model = Transformer(config)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 63)
    variables = model.init(jax.random.key(1), tokens)
    logits = model.apply(variables, tokens)
    hidden = model.apply(variables, tokens, return_hidden=True)
    assert hidden.shape == (2, 16, 32)
    again = model.apply(variables, hidden[:, 3:7], method=Transformer.logits_from_hidden)
    np.testing.assert_allclose(np.asarray(again), np.asarray(logits[:, 3:7]), rtol=1e-6, atol=1e-6)


def test_xla_attention_in_query_blocks_matches_numpy_and_unblocked_gradients():
    """Long sequences run the xla backend a block of queries at a time; every query's output is
    the plain softmax attention (NumPy here), and the gradients equal the unblocked ones."""
    from llada_jax.model.attention import MaskInfo, xla_attention

    rng = np.random.default_rng(0)
    b, length, h, kvh, d = 2, 12, 4, 2, 8
    q = rng.normal(size=(b, length, h, d)).astype(np.float32)
    k = rng.normal(size=(b, length, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, length, kvh, d)).astype(np.float32)
    key_mask = np.ones((b, length), bool)
    key_mask[1, 9:] = False
    segments = np.ones((b, length), np.int32)
    segments[0, 5:] = 2
    mask = MaskInfo(jnp.asarray(key_mask), jnp.asarray(segments))

    expected = np.zeros_like(q)
    for bi in range(b):
        for head in range(h):
            kv = head // (h // kvh)
            scores = q[bi, :, head] @ k[bi, :, kv].T / np.sqrt(d)
            visible = key_mask[bi][None, :] & (segments[bi][:, None] == segments[bi][None, :])
            scores = np.where(visible, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            expected[bi, :, head] = (weights / weights.sum(-1, keepdims=True)) @ v[bi, :, kv]
    blocked = xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, query_block=4)
    np.testing.assert_allclose(np.asarray(blocked), expected, rtol=1e-5, atol=1e-5)

    def grads(block):
        def total(q_, k_, v_):
            out = xla_attention(q_, k_, v_, mask, query_block=block)
            return jnp.sum(out * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jax.grad(total, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))

    for g_blocked, g_plain in zip(grads(4), grads(length), strict=True):
        np.testing.assert_allclose(np.asarray(g_blocked), np.asarray(g_plain), rtol=1e-5,
                                   atol=1e-4)
