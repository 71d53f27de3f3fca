"""The lm-eval model `llada_jax` against independent references, and end to end through lm-eval.

A tiny model is trained here (a few hundred steps, seconds) on "c>c": after a letter and ">"
comes the same letter, then EOS padding. References:
* the adapter's likelihood equals `diffusion.likelihood.log_likelihood` (the project's estimator,
  a separate code path: its own packing and jit) given the same pair and key;
* with a one-token continuation the estimate is the exact log-probability, computed here in NumPy
  from the model's logits at the masked position (a softmax written in this file);
* batch composition and order leave each request's result unchanged;
* the local tasks of tests/data/eval_tasks/ run through lm-eval's real `simple_evaluate`:
  4-way multiple choice (chance 0.25) and exact-match generation (chance about 1/100);
* an interrupted evaluation resumes from its cache without recomputing finished requests.
"""

import functools
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from llada_jax.config import default_config
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.evaluation.lm import LladaJaxLM, pair_rng
from llada_jax.evaluation.tasks import local_task_folder
from llada_jax.train import state as state_lib
from tests.test_lm_eval_more import model_logits

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval_tasks")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
STEPS = 250


def tiny_config():
    config = default_config()
    config.model.max_sequence_length = 64
    config.data.tokenizer = "char"
    config.sampler.gen_length = 2
    config.sampler.block_length = 2
    config.sampler.steps = 2
    config.model.init_std = 0.1   # larger than the default 0.02: learns the copy in ~200 steps
    return config


@functools.cache
def trained(steps: int = STEPS):
    """(config, params) of the tiny model after `steps` of the 1/p-weighted masked loss on
    "c>c" (what the multiple-choice task scores) and "c>c" + EOS (what generation of 2 tokens
    sees); steps=0: the untrained initialisation."""
    config, tokenizer = tiny_config(), CharTokenizer()
    model = state_lib.make_model(config)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = nn.meta.unbox(variables["params"])
    rows = np.asarray([[*tokenizer.encode(f"{c}>{c}"), tokenizer.eos_id] for c in LETTERS],
                      np.int32)
    data, mask_id = jnp.asarray(rows), config.model.mask_token_id
    tx = optax.adam(1e-2)

    def masked_loss(p, batch, key):
        t_key, m_key = jax.random.split(key)
        prob = (1 - 1e-3) * jax.random.uniform(t_key, (batch.shape[0], 1)) + 1e-3
        noised = jax.random.uniform(m_key, batch.shape) < prob
        logits = model.apply({"params": p}, jnp.where(noised, mask_id, batch))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch)
        return jnp.sum(jnp.where(noised, ce / prob, 0.0)) / batch.size

    def loss_fn(p, key):
        r_key, k3, k4 = jax.random.split(key, 3)
        batch = data[jax.random.randint(r_key, (64,), 0, 26)]
        return masked_loss(p, batch[:, :3], k3) + masked_loss(p, batch, k4)

    @jax.jit
    def step(p, opt, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, key)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(params)
    for i in range(steps):
        params, opt, _ = step(params, opt, jax.random.key(i + 1))
    return config, params


def make_lm(steps=STEPS, **kwargs):
    config, params = trained(steps)
    settings = {"mc_num": 8, "mc_batch_size": 4, "pairs_per_call": 4, "pad_multiple": 8,
                "gen_batch_size": 4, "prompt_bucket": 8, "progress": False} | kwargs
    return LladaJaxLM(params=params, config=config, tokenizer=CharTokenizer(), **settings)


def ll_request(context, continuation, idx=0):
    return Instance("loglikelihood", {}, (context, continuation), idx)


PAIRS = [("a>", "a"), ("q>", "qb"), ("hello>", "xyz"), ("z>", "zz>"), ("m", ">m"), ("b>", "c")]


def test_loglikelihood_equals_the_projects_estimator():
    lm = make_lm()
    got = [v for v, _ in lm.loglikelihood([ll_request(c, a) for c, a in PAIRS])]
    tok = CharTokenizer()
    for (context, answer), value in zip(PAIRS, got, strict=True):
        p, a = tok.encode(context), tok.encode(answer)
        mc = (1, 1) if len(a) == 1 else (8, 4)
        expected = log_likelihood(lm.params, lm.model, [p], [a], pair_rng(0, p, a),
                                  mc_num=mc[0], batch_size=mc[1], pad_id=tok.pad_id,
                                  pairs_per_call=1, pad_multiple=8)[0]
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


def numpy_log_prob(params, model, context_ids, token):
    """log softmax(logits)[token] at the masked position after the context (float64 NumPy)."""
    ids = np.asarray([[*context_ids, model.config.mask_token_id]], np.int32)
    logits = np.asarray(model_logits(params, jnp.asarray(ids), model=model), np.float64)[0, -1]
    shifted = logits - logits.max()
    return shifted[token] - np.log(np.exp(shifted).sum())


@pytest.mark.parametrize("cfg", [0.0])
def test_one_token_continuation_is_the_exact_log_prob(cfg):
    lm = make_lm(mc_num=1, mc_batch_size=1, cfg=cfg)
    tok = CharTokenizer()
    requests = [ll_request(f"{c}>", d) for c, d in ("aa", "ab", "kk", "kz")]
    got = [v for v, _ in lm.loglikelihood(requests)]
    for request, value in zip(requests, got, strict=True):
        context, answer = request.args
        expected = numpy_log_prob(lm.params, lm.model, tok.encode(context), tok.encode(answer)[0])
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-4)
    # The trained model knows the copy: the right letter is far likelier than a wrong one.
    assert got[0] > -0.5 > -3 > got[1] and got[2] > -0.5 > -3 > got[3]


def test_batch_composition_does_not_change_results():
    lm = make_lm()
    alone = [lm.loglikelihood([ll_request(c, a)])[0][0] for c, a in PAIRS]
    together = [v for v, _ in lm.loglikelihood([ll_request(c, a) for c, a in PAIRS[::-1]])][::-1]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def run_tasks(lm, limit=None):
    folder, names = local_task_folder([os.path.join(TASKS, "copy_letter_mc.yaml"),
                                       os.path.join(TASKS, "copy_letter_gen.yaml")])
    # Only the local tasks: indexing lm-eval's ~15,000 built-in task YAMLs (include_defaults)
    # costs about 20 CPU seconds per TaskManager and none of them is used.
    manager = TaskManager(include_path=folder, include_defaults=False)
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                          log_samples=False, bootstrap_iters=0)
    return out["results"]


def test_local_tasks_through_lm_eval_trained_and_untrained():
    results = run_tasks(make_lm())
    assert results["copy_letter_mc"]["acc,none"] >= 0.9
    assert results["copy_letter_gen"]["exact_match,none"] >= 0.9
    untrained = run_tasks(make_lm(steps=0))
    # 24 questions, 4 choices: 0.25 expected; 0.6 is over 3.5 standard deviations above it.
    assert untrained["copy_letter_mc"]["acc,none"] <= 0.6
    assert untrained["copy_letter_gen"]["exact_match,none"] <= 0.25


def test_interrupt_and_resume_reuses_finished_requests(tmp_path):
    cache = str(tmp_path / "cache.jsonl")
    pairs = [*PAIRS, ("a>", "b"), ("c>", "c"), ("d>", "q"), ("e>", "e"), ("f>", "fg"),
             ("g>", "h")]
    requests = [ll_request(c, a, i) for i, (c, a) in enumerate(pairs)]
    reference = make_lm().loglikelihood(requests)
    full_calls = make_lm()
    full_calls.loglikelihood(requests)
    interrupted = make_lm(cache_path=cache)
    original = interrupted._estimate_pairs
    calls = []

    def dies_on_third(bucket, pairs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(pairs))
        return original(bucket, pairs)

    interrupted._estimate_pairs = dies_on_third
    with pytest.raises(KeyboardInterrupt):
        interrupted.loglikelihood(requests)
    resumed = make_lm(cache_path=cache)
    assert len(resumed.request_cache) == sum(calls) > 0   # the two finished batches
    result = resumed.loglikelihood(requests)
    assert resumed.model_calls == full_calls.model_calls - 2
    np.testing.assert_allclose([v for v, _ in result], [v for v, _ in reference], rtol=1e-6)
    again = make_lm(cache_path=cache)
    assert again.loglikelihood(requests) == result and again.model_calls == 0
