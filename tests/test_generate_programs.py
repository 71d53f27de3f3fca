"""launch/generate.py, launch/chat.py and launch/evaluate.py end to end on a tiny checkpoint."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.config import default_config, model_config
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.diffusion.sampler import SamplerConfig, generate, pad_prompts
from llada_jax.model.transformer import Transformer
from llada_jax.train.checkpoint import save_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    config = default_config()
    config.model.init_std = 0.3   # spread-out logits: no near-ties between runs
    config.sampler.gen_length, config.sampler.block_length, config.sampler.steps = 16, 8, 8
    model = Transformer(model_config(config))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    directory = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_params(directory, config, params)
    return directory, config, model, params


def run_program(name, *args, stdin=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device: quick start
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", name), *args],
                            input=stdin, capture_output=True, text=True, env=env, timeout=300,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def expected_completion(config, model, params, prompt_ids, rng):
    """The library's sampler on one prompt, cut at EOS / EoT and decoded."""
    tokenizer = CharTokenizer()
    sampler = SamplerConfig.from_config(config, eot_id=tokenizer.eot_id,
                                        vocab_limit=tokenizer.vocab_size)
    tokens, mask = pad_prompts([prompt_ids], tokenizer.pad_id)
    out = np.asarray(generate(params, model, tokens, mask, sampler, rng))[0, len(prompt_ids):]
    answer = []
    for t in out:
        if t in (tokenizer.eos_id, tokenizer.eot_id):
            break
        answer.append(int(t))
    return tokenizer.decode(answer)


def test_generate_program(tiny_checkpoint, tmp_path):
    directory, config, model, params = tiny_checkpoint
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text('A third prompt\n\n"with\\na newline"\n')
    output = tmp_path / "out.jsonl"
    stdout = run_program("generate.py", f"--checkpoint={directory}", "--prompt=Hello",
                         "--prompt=2+2=", f"--prompts_file={prompts_file}", "--seed=5",
                         "--batch_size=2", f"--output={output}")
    assert stdout.count("=== prompt") == 4
    stats = json.loads(stdout.strip().splitlines()[-1])
    assert stats["generated_tokens"] == 4 * 16
    assert stats["forward_passes"] == 2 * 8          # two calls of 8 steps
    assert stats["tokens_per_second"] > 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "2+2=", "A third prompt",
                                              "with\na newline"]
    tokenizer = CharTokenizer()
    first = expected_completion(config, model, params,
                                [tokenizer.bos_id, *tokenizer.encode("Hello")],
                                jax.random.fold_in(jax.random.key(5), 0))
    assert records[0]["completion"] == first


def test_generate_program_fast_options_and_errors(tiny_checkpoint):
    directory, *_ = tiny_checkpoint
    stdout = run_program("generate.py", f"--checkpoint={directory}", "--prompt=Hi", "--chat",
                         "--cache=dual", "--threshold=0.5", "--early_exit", "--gen_length=16",
                         "--block_length=4")
    stats = json.loads(stdout.strip().splitlines()[-1])
    assert 4 <= stats["forward_passes"] <= 16   # threshold: between 1 and 4 passes per block
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "generate.py"),
                          f"--checkpoint={directory}", "--prompt=Hi", "--block_length=5"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert bad.returncode != 0 and "sampler.block_length" in bad.stderr


def test_chat_program(tiny_checkpoint):
    directory, config, model, params = tiny_checkpoint
    stdout = run_program("chat.py", f"--checkpoint={directory}", "--seed=3",
                         stdin="hello\nand then?\n/reset\n\nbye\n")
    lines = stdout.splitlines()
    replies = [line for line in lines if line.startswith("assistant:")]
    assert len(replies) == 3 and "(new conversation)" in lines
    tokenizer = CharTokenizer()
    prompt = tokenizer.render_chat([{"role": "user", "content": "hello"}])
    first = expected_completion(config, model, params, prompt,
                                jax.random.fold_in(jax.random.key(3), 0))
    assert replies[0] == f"assistant: {first}"


def test_evaluate_program(tiny_checkpoint, tmp_path):
    directory, config, model, params = tiny_checkpoint
    tokenizer = CharTokenizer()
    apply = jax.jit(lambda x: model.apply({"params": params}, x))

    def exact_log_prob(context, option):
        ids = [tokenizer.bos_id, *tokenizer.encode(context)]
        logits = np.asarray(apply(jnp.asarray([[*ids, config.model.mask_token_id]])),
                            np.float64)[0, -1]
        logits -= logits.max()
        return logits[tokenizer.encode(option)[0]] - np.log(np.exp(logits).sum())

    questions = [("The sky is", ["a", "b", "c"]), ("1+1=", ["2", "3"])]
    labels = [int(np.argmax([exact_log_prob(q, o) for o in options]))
              for q, options in questions]
    data = tmp_path / "eval.jsonl"
    lines = [{"prompt": "Hello", "answer": "x"}, {"prompt": "Hi", "answer": " there"}]
    lines += [{"question": q, "choices": o, "label": label}
              for (q, o), label in zip(questions, labels, strict=True)]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "scores.jsonl"
    stdout = run_program("evaluate.py", f"--checkpoint={directory}", f"--data={data}",
                         "--mc_num=1", "--mc_batch_size=1", f"--output={output}",
                         "--pairs_per_call=4")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["multiple_choice"] == {"records": 2, "accuracy": 1.0}
    assert summary["likelihood"]["records"] == 2
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    # One answer token and mc_num = 1: the estimate is the exact log-probability.
    np.testing.assert_allclose(scored[0]["log_likelihood"], exact_log_prob("Hello", "x"),
                               rtol=1e-4, atol=1e-4)
    assert scored[1]["log_likelihood"] < 0
    assert [s["prediction"] for s in scored[2:]] == labels


@pytest.mark.parametrize("program,args,message", [
    ("generate.py", ["--prompt=Hi"], "error: checkpoint directory not found: "),
    ("chat.py", [], "error: checkpoint directory not found: "),
    ("evaluate.py", ["--data=/nonexistent/eval.jsonl"], "error: --data file not found: "),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, program, args, message):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", program),
                             f"--checkpoint={tmp_path / 'missing'}", *args], input="",
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
