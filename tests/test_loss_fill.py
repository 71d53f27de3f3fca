"""The `fill` contract of conversation batches: the loss equals the official one of the batch
padded only to the longest row of each micro-batch.

The expected losses are computed here, independently, with the PyTorch reference model
(tests/torch_reference.py) on the TRIMMED micro-batches, following the official formulas:
LLaDA's SFT (GUIDELINES.md: `sum(CE / p / answer_len) / batch`, answer_len counting the EOS
padding up to the longest row) and LLaDA-V's `modeling_llada.py` (`sum(CE / p /
labelled_count) / batch`, padding not labelled). The noise (mask probability and which positions
are noised) is taken from the step, so both sides score the same positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llada_jax import config as config_lib
from llada_jax.model.transformer import Transformer
from llada_jax.train import step as step_lib
from tests.test_model import params_from_reference, tiny
from tests.torch_reference import RefConfig, random_reference

MASK_ID = 5
EOS = 2
LENGTH = 16


def _model_and_reference():
    c = tiny()
    ref = random_reference(RefConfig(c.vocab_size, c.d_model, c.n_layers, c.n_heads,
                                     c.n_kv_heads, c.mlp_hidden_size, c.rope_theta,
                                     c.rms_norm_eps), seed=7)
    return Transformer(c), params_from_reference(ref, c), ref


def _conversations(prompt_lengths, real_lengths, objective):
    """Rows: prompt, answer (ending with EOS), then EOS fill up to LENGTH.

    SFT: every non-prompt position is maskable (fill included); masked_response: the answer is
    labelled, and so is the BOS-like first token (any labelled prompt position is allowed), the
    fill never is.
    """
    rng = np.random.default_rng(3)
    rows = len(prompt_lengths)
    tokens = rng.integers(8, 90, size=(rows, LENGTH)).astype(np.int32)
    maskable = np.zeros((rows, LENGTH), bool)
    fill = np.zeros((rows, LENGTH), bool)
    for r, (prompt, real) in enumerate(zip(prompt_lengths, real_lengths, strict=True)):
        tokens[r, real - 1:] = EOS
        fill[r, real:] = True
        if objective == "sft":
            maskable[r, prompt:] = True
        else:
            maskable[r, prompt:real] = True
            maskable[r, 0] = True
    return {"tokens": tokens, "maskable": maskable, "fill": fill}


def _reference_micro_loss(ref, batch, noised, mask_prob, rows, objective, prompt_lengths,
                          real_lengths):
    """The official loss of micro-batch `rows`, padded only to its longest row."""
    longest = max(real_lengths[r] for r in rows)
    tokens = torch.from_numpy(batch["tokens"][rows, :longest].astype(np.int64))
    masked = torch.from_numpy(noised[rows, :longest])
    noisy = torch.where(masked, MASK_ID, tokens)
    with torch.no_grad():
        logits = ref(noisy).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                         reduction="none").reshape(tokens.shape)
    p = torch.from_numpy(mask_prob[rows].astype(np.float32))[:, None]
    if objective == "sft":  # answer_len: everything after the prompt, up to the longest row
        normaliser = torch.tensor([longest - prompt_lengths[r] for r in rows])[:, None]
    else:  # labelled tokens: the first token and the answer, never the padding
        normaliser = torch.tensor([1 + real_lengths[r] - prompt_lengths[r] for r in rows])[:, None]
    token_loss = torch.where(masked, ce / p / normaliser, 0.0)
    return float(token_loss.sum() / len(rows))


@pytest.mark.parametrize("objective,chunk", [("sft", 0), ("masked_response", 0), ("sft", 5)])
def test_fill_loss_equals_reference_on_batch_trimmed_to_longest_row(objective, chunk):
    model, params, ref = _model_and_reference()
    prompt_lengths = [3, 4, 2, 5]
    real_lengths = [9, 12, 6, 7]       # micro-batch 0 = rows 0, 2 (longest 9); 1 = rows 1, 3 (12)
    batch = _conversations(prompt_lengths, real_lengths, objective)
    train = config_lib.default_config().train
    train.objective = objective
    train.mask_eps = 0.3  # many noised positions in every row, so every term is exercised
    prepared = step_lib.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()}, train,
                                      MASK_ID, jax.random.key(11), allow_cut=True,
                                      num_micro_batches=2)
    noised = np.asarray(prepared["noised"])
    mask_prob = np.asarray(prepared["mask_prob"])
    longest = np.array([9, 12, 9, 12])
    beyond = np.arange(LENGTH)[None, :] >= longest[:, None]
    assert not noised[beyond].any()                        # never noised past the longest row
    assert not np.asarray(prepared["key_mask"])[beyond].any()   # never attended
    assert np.asarray(prepared["key_mask"])[~beyond].all()      # fill before it is attended
    assert not noised[~batch["maskable"]].any()
    if objective == "sft":  # the fill before the longest row is trained on: some of it noised
        assert noised[batch["fill"] & ~beyond].any()

    loss_fn = jax.jit(step_lib.make_loss_fn(model, objective, chunk))
    micro_batches = step_lib.split_micro_batches(prepared, 2)
    got = [float(loss_fn(params, jax.tree.map(lambda x, j=j: x[j], micro_batches))[0])
           for j in range(2)]
    expected = [_reference_micro_loss(ref, batch, noised, mask_prob, rows, objective,
                                      prompt_lengths, real_lengths) for rows in ([0, 2], [1, 3])]
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_batch_without_fill_is_unchanged():
    """No `fill` key: no key mask is built (attention backends without mask support still run),
    and the noise and loss equal those of a batch whose fill is all False."""
    model, params, _ = _model_and_reference()
    batch = _conversations([3, 4], [LENGTH, LENGTH], "sft")
    train = config_lib.default_config().train
    train.objective = "sft"
    plain = {k: jnp.asarray(v) for k, v in batch.items() if k != "fill"}
    prepared = step_lib.prepare_batch(plain, train, MASK_ID, jax.random.key(2), allow_cut=True)
    assert "key_mask" not in prepared
    with_fill = step_lib.prepare_batch({**plain, "fill": jnp.zeros((2, LENGTH), bool)}, train,
                                       MASK_ID, jax.random.key(2), allow_cut=True)
    np.testing.assert_array_equal(prepared["noised"], with_fill["noised"])
    np.testing.assert_array_equal(prepared["maskable"], batch["maskable"])
    loss_fn = step_lib.make_loss_fn(model, "sft")
    np.testing.assert_allclose(float(loss_fn(params, prepared)[0]),
                               float(loss_fn(params, with_fill)[0]), rtol=1e-6)


def test_fill_of_the_wrong_shape_is_a_one_line_error():
    train = config_lib.default_config().train
    batch = {"tokens": jnp.zeros((2, 8), jnp.int32), "fill": jnp.zeros((2, 7), bool)}
    with pytest.raises(ValueError, match=r"batch\['fill'\].*\(2, 8\).*\(2, 7\)"):
        step_lib.prepare_batch(batch, train, MASK_ID, jax.random.key(0), allow_cut=False)
