"""Training-time evaluators: held-out ELBO equals the likelihood module; specs are checked.

The held-out check is an equality, so it uses the random tiny model of tests/test_lm_eval_more.py
(spread-out logits: every token's log-probability differs) instead of training one."""

import json

import numpy as np
import pytest

from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.train.evaluators import make_evaluators, run_evaluators
from tests.test_lm_eval_more import tiny


def test_held_out_elbo_is_the_mean_nll_per_token(tmp_path):
    data = tmp_path / "heldout.jsonl"
    records = [{"prompt": "a>", "answer": "a"}, {"prompt": "q>", "answer": "q"},
               {"question": "k>", "choices": ["z", "k"], "label": 1}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config, params = tiny()
    tok = CharTokenizer()
    (evaluator,) = make_evaluators([{"kind": "elbo", "data": str(data), "mc_num": 1,
                                     "add_bos": False, "name": "heldout"}], config, tok)
    metrics = run_evaluators([evaluator], params, step=7)
    # One-token answers with mc_num 1: exact log-probs, from the likelihood module directly.
    import jax

    exact = log_likelihood(params, evaluator.model, [tok.encode("a>"), tok.encode("q>")],
                           [tok.encode("a"), tok.encode("q")], jax.random.key(0), mc_num=1,
                           batch_size=1, pad_id=tok.pad_id)
    np.testing.assert_allclose(metrics["eval/heldout/nll_per_token"], -np.mean(exact),
                               rtol=1e-5)
    assert metrics["eval/heldout/choice_accuracy"] in (0.0, 1.0)


def test_bad_specs_name_the_evaluator():
    config, _ = tiny()
    with pytest.raises(ValueError, match=r"^evaluator 0: 'kind' must be one of \['elbo', 'tasks'\] "
                                         r"or 'module:Class', found 'bleu'$"):
        make_evaluators([{"kind": "bleu"}], config, CharTokenizer())
    with pytest.raises(ValueError, match=r"^evaluator 0: cannot load kind 'no_such.module:X'"):
        make_evaluators([{"kind": "no_such.module:X"}], config, CharTokenizer())
    with pytest.raises(ValueError, match=r"evaluator 0 \(elbo\): expected a 'data'"):
        make_evaluators([{"kind": "elbo"}], config, CharTokenizer())


def test_trainer_runs_the_configured_evaluators(tmp_path):
    """`train.evaluators` run every eval_every steps; their metrics reach the eval history and
    equal the likelihood module's exact value on the params the trainer ends with."""
    from llada_jax import config as config_lib
    from llada_jax.train import trainer

    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"prompt": "add: 1 + 2 = ", "answer": "3"}) + "\n")
    config = config_lib.default_config()
    config.mesh.fsdp = 1
    config.train.update(steps=2, batch_size=4, seq_len=32, warmup_steps=1, log_every=1,
                        checkpoint_every=0, eval_every=2, eval_batches=1)
    config.data.eval_source = "synthetic"
    config.train.evaluators = [{"kind": "elbo", "data": str(data), "mc_num": 1,
                                "add_bos": False, "name": "heldout"}]
    import jax

    result = trainer.train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    (last,) = result.eval_history
    tok = CharTokenizer()
    from llada_jax.train import state as state_lib

    exact = log_likelihood(result.state.params, state_lib.make_model(config),
                           [tok.encode("add: 1 + 2 = ")], [tok.encode("3")], jax.random.key(0),
                           mc_num=1, batch_size=1, pad_id=tok.pad_id)
    np.testing.assert_allclose(last["heldout/nll_per_token"], -exact[0], rtol=1e-5)
