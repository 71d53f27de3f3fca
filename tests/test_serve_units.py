"""Serving units without a model: answer text from blocks (stops, hold-back, max_tokens) and the
request validation messages."""

import numpy as np
import pytest

from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.serving import protocol
from llada_jax.serving.answers import Answer

TOK = CharTokenizer()


def _ids(text):
    return TOK.encode(text)


def _stream(answer, generated, block):
    """Deltas of `generated` fed block by block, then the final delta."""
    deltas = [answer.add_block(i, generated[i * block:(i + 1) * block])
              for i in range(len(generated) // block)]
    return deltas, answer.finish(np.asarray(generated))


def test_answer_stops_at_eos_and_counts_its_tokens():
    generated = [*_ids("hi there"), TOK.eos_id, *_ids("zzz")]   # 12 ids
    deltas, last = _stream(Answer(TOK, max_tokens=12), generated, 4)
    assert deltas == ["hi t", "here", ""] and last == ""
    answer = Answer(TOK, max_tokens=12)
    answer.finish(np.asarray(generated))
    assert (answer.text, answer.finish_reason, answer.completion_tokens) == ("hi there", "stop", 8)


def test_answer_cut_at_max_tokens_is_a_length_finish():
    answer = Answer(TOK, max_tokens=5)
    answer.finish(np.asarray(_ids("abcdefgh")))
    assert (answer.text, answer.finish_reason, answer.completion_tokens) == ("abcde", "length", 5)


def test_stop_string_across_blocks_is_held_back_then_cut():
    generated = _ids("one STOP two")                                  # 12 ids, blocks of 4
    answer = Answer(TOK, max_tokens=12, stop=["STOP"])
    deltas, last = _stream(answer, generated, 4)
    # "one " could not end a stop string of 4 characters, but its last 3 could start one.
    assert deltas == ["o", "ne ", ""] and last == ""
    assert (answer.text, answer.finish_reason, answer.completion_tokens) == ("one ", "stop", 4)
    assert "".join(deltas) + last == answer.text


@pytest.mark.parametrize("body,message", [
    (b"[1, 2]", "request body: expected a JSON object, found list"),
    (b'{"prompt": []}', "prompt: expected a string or a non-empty list of strings"),
    (b'{"prompt": "a", "n": 0}', "n: input should be greater than or equal to 1, found 0"),
    (b'{"prompt": "a", "stream": "yes"}', "stream: input should be a valid boolean, found 'yes'"),
    (b'{"prompt": "a", "stop": ["x", ""]}', "stop[1]: expected a non-empty string"),
    (b'{"prompt": "a", "threshold": 2}', "threshold: input should be less than or equal to 1"),
    (b'{"prompt": "a", "logprobs": 3}', "logprobs: log probabilities are not supported"),
    (b'{"prompt": "a", "seed": 9223372036854775800}',
     "seed: input should be less than or equal to 9223372036854775792"),
])
def test_request_validation_names_the_field(body, message):
    with pytest.raises(protocol.RequestError) as error:
        request = protocol.parse(body, protocol.CompletionRequest)
        request.prompts()
        request.stop_strings()
    assert str(error.value).startswith(message), str(error.value)
    assert error.value.status == 400


def test_whole_numbers_are_accepted_as_floats_and_user_is_ignored():
    request = protocol.parse(b'{"prompt": "a", "temperature": 1, "user": "me"}',
                             protocol.CompletionRequest)
    assert request.temperature == 1.0 and request.sampler_overrides() == {"temperature": 1.0}


def test_a_bad_bucket_flag_is_one_error_line_before_loading(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, os.path.join(root, "launch", "serve.py"),
         f"--checkpoint={tmp_path / 'missing'}", "--gen_buckets=8,x"],
        capture_output=True, text=True, timeout=120, cwd=root, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --gen_buckets: expected comma-separated integers, found '8,x'")
