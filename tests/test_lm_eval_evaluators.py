"""Training-time evaluators: held-out ELBO equals the likelihood module; specs are checked."""

import json

import numpy as np
import pytest

from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.train.evaluators import make_evaluators, run_evaluators
from tests.test_lm_eval import trained


def test_held_out_elbo_is_the_mean_nll_per_token(tmp_path):
    data = tmp_path / "heldout.jsonl"
    records = [{"prompt": "a>", "answer": "a"}, {"prompt": "q>", "answer": "q"},
               {"question": "k>", "choices": ["z", "k"], "label": 1}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config, params = trained()
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
    config, _ = trained()
    with pytest.raises(ValueError, match="evaluator 0: 'kind' must be 'elbo' or 'tasks'"):
        make_evaluators([{"kind": "bleu"}], config, CharTokenizer())
    with pytest.raises(ValueError, match=r"evaluator 0 \(elbo\): expected a 'data'"):
        make_evaluators([{"kind": "elbo"}], config, CharTokenizer())
