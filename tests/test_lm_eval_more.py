"""The lm-eval model `llada_jax` beyond plain scoring: CFG, whole-text ELBOs, the chat-template
path, and likelihood batches sharded over a mesh.

References: the project's likelihood function (`diffusion.likelihood.log_likelihood`, its own
packing and jit) on the same pairs and keys; for a one-token continuation with CFG, the exact
guided log-probability written here in NumPy from the model's logits (REFERENCE.md section 4:
`un + (cfg + 1) (cond - un)`, the prompt masked in the unconditional twin); the released chat
template (Jinja, as in LLaDA-8B-Instruct's tokenizer_config.json) rendered with jinja2.
A random tiny model is enough: every check is an equality, not an accuracy.
"""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import jinja2
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from llada_jax import parallel
from llada_jax.config import default_config
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.evaluation.lm import LladaJaxLM, pair_rng
from llada_jax.train import state as state_lib

TOK = CharTokenizer()
# The chat template of the released LLaDA-8B-Instruct tokenizer_config.json (bos_token
# "<|startoftext|>").
OFFICIAL_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
    "assistant<|end_header_id|>\n\n' }}{% endif %}")


@functools.cache
def tiny():
    config = default_config()
    config.model.max_sequence_length = 64
    config.model.init_std = 0.3   # spread-out logits: estimates far from each other
    config.data.tokenizer = "char"
    model = state_lib.make_model(config)
    return config, nn.meta.unbox(model.init(jax.random.key(0),
                                            jnp.zeros((1, 4), jnp.int32))["params"])


def make_lm(**kwargs):
    config, params = tiny()
    settings = {"mc_num": 4, "mc_batch_size": 2, "pairs_per_call": 4, "pad_multiple": 8,
                "progress": False} | kwargs
    return LladaJaxLM(params=params, config=config, tokenizer=TOK, **settings)


def ll_request(context, continuation, idx=0):
    return Instance("loglikelihood", {}, (context, continuation), idx)


@functools.partial(jax.jit, static_argnames="model")
def model_logits(params, ids, *, model):
    """The model's logits, compiled once per shape (op by op it takes seconds per call)."""
    return model.apply({"params": params}, ids)


def guided_log_prob(params, model, context_ids, token, cfg):
    """log softmax(un + (cfg + 1) (cond - un))[token] at the one masked position (NumPy)."""
    mask = model.config.mask_token_id
    cond = np.asarray([[*context_ids, mask]], np.int32)
    uncond = np.full_like(cond, mask)
    logits = [np.asarray(model_logits(params, jnp.asarray(ids), model=model), np.float64)[0, -1]
              for ids in (cond, uncond)]
    guided = logits[1] + (cfg + 1) * (logits[0] - logits[1])
    shifted = guided - guided.max()
    return shifted[token] - np.log(np.exp(shifted).sum())


def test_cfg_loglikelihood_equals_the_projects_likelihood_with_cfg():
    lm = make_lm(cfg=0.5)
    pairs = [("a>", "bc"), ("hello>", "xyz"), ("q>", "r")]   # two compiled shapes
    got = [v for v, _ in lm.loglikelihood([ll_request(c, a) for c, a in pairs])]
    for (context, answer), value in zip(pairs, got, strict=True):
        p, a = TOK.encode(context), TOK.encode(answer)
        mc = (1, 1) if len(a) == 1 else (4, 2)
        expected = log_likelihood(lm.params, lm.model, [p], [a], pair_rng(0, p, a),
                                  mc_num=mc[0], batch_size=mc[1], cfg_scale=0.5,
                                  pad_id=TOK.pad_id, pairs_per_call=1, pad_multiple=8)[0]
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
    # One continuation token: the exact guided log-probability, computed independently.
    np.testing.assert_allclose(got[2], guided_log_prob(lm.params, lm.model, TOK.encode("q>"),
                                                       TOK.encode("r")[0], 0.5),
                               rtol=1e-4, atol=1e-4)
    # Guidance changes the estimate (else the test above would not test CFG).
    plain = guided_log_prob(lm.params, lm.model, TOK.encode("q>"), TOK.encode("r")[0], 0.0)
    assert abs(plain - got[2]) > 1e-3


def test_loglikelihood_rolling_is_the_elbo_of_the_whole_text():
    lm = make_lm(add_bos=True)
    # 64 positions, BOS padded to 8: windows of 56 tokens. Every window below is 50..56 tokens,
    # so one compiled shape serves them all.
    short, long = "the cat sat on the mat and then it sat on the hat...", "".join(
        chr(97 + i % 26) for i in range(110))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0),
                                    Instance("loglikelihood_rolling", {}, (long,), 1)])

    def elbo(prefix, ids):
        return log_likelihood(lm.params, lm.model, [prefix], [ids], pair_rng(0, prefix, ids),
                              mc_num=4, batch_size=2, pad_id=TOK.pad_id, pairs_per_call=1,
                              pad_multiple=8)[0]

    bos = [TOK.bos_id]
    np.testing.assert_allclose(got[0], elbo(bos, TOK.encode(short)), rtol=1e-5, atol=1e-5)
    # Two windows whose ELBOs add up.
    ids = TOK.encode(long)
    expected = elbo(bos, ids[:56]) + elbo(bos, ids[56:])
    np.testing.assert_allclose(got[1], expected, rtol=1e-5, atol=1e-4)


def test_chat_template_renders_the_official_template_and_reads_back():
    lm = make_lm()
    history = [{"role": "system", "content": "Answer briefly. "},
               {"role": "user", "content": " What is 2+2?"},
               {"role": "assistant", "content": "4"},
               {"role": "user", "content": "And 3+3?"}]
    official = jinja2.Environment().from_string(OFFICIAL_TEMPLATE)
    for add_generation_prompt in (True, False):
        expected = official.render(messages=history, bos_token="<|startoftext|>",
                                   add_generation_prompt=add_generation_prompt)
        rendered = lm.apply_chat_template(history, add_generation_prompt=add_generation_prompt)
        assert rendered == expected
        # The rendered text reads back as the chat ids (special tokens as their ids).
        assert lm.encode(rendered) == TOK.render_chat(history, add_generation_prompt)
    assert lm.tokenizer_name == "CharTokenizer" and lm.chat_template(True)


TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval_tasks")


def test_chat_template_through_lm_eval():
    from lm_eval import simple_evaluate

    from llada_jax.evaluation.tasks import load_tasks

    # Only local files: lm-eval's built-in task index (about 20 CPU seconds) is not read.
    names, manager = load_tasks([os.path.join(TASKS, "copy_letter_mc.yaml")])
    assert names == ["copy_letter_mc"]
    assert "copy_letter_mc" in manager.all_tasks and "hellaswag" not in manager.all_tasks
    lm = make_lm(mc_num=1, mc_batch_size=1)
    seen = []
    score = lm.loglikelihood

    def recording(requests):
        seen.extend(r.args for r in requests)
        return score(requests)

    lm.loglikelihood = recording
    out = simple_evaluate(model=lm, tasks=names, limit=2, apply_chat_template=True,
                          task_manager=manager, log_samples=False, bootstrap_iters=0)
    assert 0.0 <= out["results"]["copy_letter_mc"]["acc,none"] <= 1.0
    assert len(seen) == 8   # 2 questions x 4 choices
    # The first two documents ask about "a" and "b": each context is that one user turn.
    assert {context for context, _ in seen} == {
        lm.apply_chat_template([{"role": "user", "content": f"{letter}>"}]) for letter in "ab"}


def test_a_registered_task_name_reads_lm_evals_index_and_an_unknown_one_is_refused():
    from llada_jax.evaluation.tasks import load_tasks

    # hellaswag is one of lm-eval's own tasks (found: not in the message), the other is nobody's.
    with pytest.raises(ValueError, match=r"^--tasks: \['no_such_task_xyz'\]: no lm-eval task"):
        load_tasks(["hellaswag", "no_such_task_xyz", os.path.join(TASKS, "copy_letter_mc.yaml")])


def test_sharded_likelihood_batches_fill_the_mesh_and_change_nothing():
    config, params = tiny()
    mesh = parallel.make_mesh()   # fsdp over the 8 test devices
    requests = [ll_request(c, a) for c, a in [("a>", "bc"), ("hello>", "xyz"), ("m", ">m")]]
    unsharded = make_lm().loglikelihood(requests)
    placed = jax.device_put(params, parallel.replicated(mesh))
    lm = LladaJaxLM(params=placed, config=config, tokenizer=TOK, mesh=mesh, mc_num=4,
                    mc_batch_size=2, pairs_per_call=3, pad_multiple=8, progress=False)
    assert lm.row_multiple == 8 and lm.pairs_per_call == 8   # rounded up to the batch axes
    sharded = lm.loglikelihood(requests)
    np.testing.assert_allclose([v for v, _ in sharded], [v for v, _ in unsharded], rtol=1e-5,
                               atol=1e-5)
