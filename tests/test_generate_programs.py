"""launch/generate.py, launch/chat.py and launch/evaluate.py end to end on a tiny checkpoint.

Every launch-program run of this file goes into one `run_programs` call (the `program_results`
fixture): each program still runs as a user runs it, in its own process with its own stdin,
stdout, stderr and flags, but the forked processes share one import of JAX, flax and orbax
instead of paying a few CPU seconds each. Each test's runs come from its `*_jobs` function
(registered with `@program_jobs`); the test checks its own results.
"""

import json
import os
import subprocess
import sys
import types

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
from tests.test_program_runner import run_programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    config = default_config()
    config.model.init_std = 0.3   # spread-out logits: no near-ties between runs
    config.sampler.gen_length, config.sampler.block_length, config.sampler.steps = 16, 8, 8
    model = Transformer(model_config(config))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"])
    directory = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_params(directory, config, params)
    return directory, config, model, params


JOB_BUILDERS = {}


def program_jobs(build):
    """Registers `build(inputs) -> (jobs, info)` for the test named like it without `_jobs`:
    jobs are run_programs jobs; info is whatever the test needs besides their results."""
    JOB_BUILDERS[build.__name__.removesuffix("_jobs")] = build
    return build


@pytest.fixture(scope="module")
def program_results(tiny_checkpoint, llada_v_checkpoint, tmp_path_factory):
    """{test name: (its jobs' results, info)}: all the jobs in one run_programs call."""
    groups = {}
    for name, build in JOB_BUILDERS.items():
        inputs = types.SimpleNamespace(folder=tmp_path_factory.mktemp(name),
                                       tiny=tiny_checkpoint, checkpoint=tiny_checkpoint[0],
                                       llada_v_checkpoint=llada_v_checkpoint)
        groups[name] = build(inputs)
    jobs = [job for group_jobs, _ in groups.values() for job in group_jobs]
    # About two minutes on the loaded 2-core box; each program had 300 s when run alone.
    results = iter(run_programs(jobs, tmp_path_factory.mktemp("runs"), timeout=1200))
    return {name: ([next(results) for _ in group_jobs], info)
            for name, (group_jobs, info) in groups.items()}


def program_stdout(result):
    """stdout of a launch program run that must have succeeded."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def last_error_line(result):
    """The last line of the output, which must be the error; no traceback before it."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


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


@program_jobs
def generate_program_jobs(inputs):
    prompts_file = inputs.folder / "prompts.txt"
    prompts_file.write_text('A third prompt\n\n"with\\na newline"\n')
    output = inputs.folder / "out.jsonl"
    return [("generate.py", [f"--checkpoint={inputs.checkpoint}", "--prompt=Hello",
                             "--prompt=2+2=", f"--prompts_file={prompts_file}", "--seed=5",
                             "--batch_size=2", f"--output={output}"], "")], output


def test_generate_program(tiny_checkpoint, program_results):
    _, config, model, params = tiny_checkpoint
    (result,), output = program_results["generate_program"]
    stdout = program_stdout(result)
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


@program_jobs
def generate_program_fast_options_and_errors_jobs(inputs):
    return [("generate.py", [f"--checkpoint={inputs.checkpoint}", "--prompt=Hi", "--chat",
                             "--cache=dual", "--threshold=0.5", "--early_exit",
                             "--gen_length=16", "--block_length=4"], ""),
            ("generate.py", [f"--checkpoint={inputs.checkpoint}", "--prompt=Hi",
                             "--block_length=5"], "")], None


def test_generate_program_fast_options_and_errors(program_results):
    (fast, bad), _ = program_results["generate_program_fast_options_and_errors"]
    stats = json.loads(program_stdout(fast).strip().splitlines()[-1])
    assert 4 <= stats["forward_passes"] <= 16   # threshold: between 1 and 4 passes per block
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --block_length: expected a "
                                                          "positive divisor of")


@program_jobs
def chat_program_jobs(inputs):
    return [("chat.py", [f"--checkpoint={inputs.checkpoint}", "--seed=3"],
             "hello\nand then?\n/reset\n\nbye\n")], None


def test_chat_program(tiny_checkpoint, program_results):
    _, config, model, params = tiny_checkpoint
    (result,), _ = program_results["chat_program"]
    lines = program_stdout(result).splitlines()
    replies = [line for line in lines if line.startswith("assistant:")]
    assert len(replies) == 3 and "(new conversation)" in lines
    tokenizer = CharTokenizer()
    prompt = tokenizer.render_chat([{"role": "user", "content": "hello"}])
    first = expected_completion(config, model, params, prompt,
                                jax.random.fold_in(jax.random.key(3), 0))
    assert replies[0] == f"assistant: {first}"


@program_jobs
def evaluate_program_jobs(inputs):
    """The labels are the options of highest exact log-probability (computed here), so the
    program must score every multiple-choice record right."""
    _, config, model, params = inputs.tiny
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
    data = inputs.folder / "eval.jsonl"
    lines = [{"prompt": "Hello", "answer": "x"}, {"prompt": "Hi", "answer": " there"}]
    lines += [{"question": q, "choices": o, "label": label}
              for (q, o), label in zip(questions, labels, strict=True)]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = inputs.folder / "scores.jsonl"
    jobs = [("evaluate.py", [f"--checkpoint={inputs.checkpoint}", f"--data={data}",
                             "--mc_num=1", "--mc_batch_size=1", f"--output={output}",
                             "--pairs_per_call=4"], "")]
    return jobs, (labels, exact_log_prob("Hello", "x"), output)


def test_evaluate_program(program_results):
    (result,), (labels, hello_x_log_prob, output) = program_results["evaluate_program"]
    summary = json.loads(program_stdout(result).strip().splitlines()[-1])
    assert summary["multiple_choice"] == {"records": 2, "accuracy": 1.0}
    assert summary["likelihood"]["records"] == 2
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    # One answer token and mc_num = 1: the estimate is the exact log-probability.
    np.testing.assert_allclose(scored[0]["log_likelihood"], hello_x_log_prob,
                               rtol=1e-4, atol=1e-4)
    assert scored[1]["log_likelihood"] < 0
    assert [s["prediction"] for s in scored[2:]] == labels


MISSING_CHECKPOINT_ERRORS = [
    ("generate.py", ["--prompt=Hi"], "error: checkpoint directory not found: "),
    ("chat.py", [], "error: checkpoint directory not found: "),
    ("evaluate.py", ["--data=/nonexistent/eval.jsonl"], "error: --data file not found: "),
]


@program_jobs
def user_errors_are_one_line_without_traceback_jobs(inputs):
    return [(program, [f"--checkpoint={inputs.folder / 'missing'}", *args], "")
            for program, args, _ in MISSING_CHECKPOINT_ERRORS], None


def test_user_errors_are_one_line_without_traceback(program_results):
    results, _ = program_results["user_errors_are_one_line_without_traceback"]
    for result, (*_, message) in zip(results, MISSING_CHECKPOINT_ERRORS, strict=True):
        assert result.returncode == 1, (result.args, result.stderr[-3000:])
        assert last_error_line(result).startswith(message), (result.args, result.stderr[-3000:])


FLAG_ERRORS = [
    (["--steps=3"], 1, "error: --steps: expected a positive multiple of the number of blocks "
                       "(2 = gen_length 16 / block_length 8), found 3"),
    (["--gen_length=12"], 1, "error: the checkpoint's sampler.block_length (from its config, set "
                             "it with --block_length): expected a positive divisor of "
                             "--gen_length=12, found 8"),
    (["--threshold=2"], 1, "error: --threshold: expected a confidence in (0, 1]"),
    (["--batch_size=0"], 2, "error: flag --batch_size=0: 0 is not a positive integer"),
    (["--prompt_bucket=0"], 2, "error: flag --prompt_bucket=0: 0 is not a positive integer"),
    (["--mesh_tensor=3"], 1, "error: --mesh_data=1 --mesh_fsdp=-1 --mesh_tensor=3 do not fit the "
                             "1 device(s)"),
    (["--tokenizer=bogus"], 1, "error: --tokenizer=bogus: expected 'char', 'sentencepiece:PATH' "
                               "or 'hf:DIR', found 'bogus'"),
    (["--tokenizer=hf:/nonexistent"], 1, "error: --tokenizer=hf:/nonexistent: "),
    (["--prompt=" + "x" * 120], 1, "error: --prompt #2: the prompt has 121 tokens, but the "
                                   "model's max_sequence_length=128 leaves room for at most 112 "
                                   "beside gen_length=16"),
]

PROMPTS_FILE_ERRORS = [
    (b'fine\n"a \\"quoted\\" one"\n"not closed\n', ':3: a line starting with \'"\' must be '
                                                   'one JSON string'),
    (b'fine\n\n\xff\xfe not text\n', ":3: not UTF-8 text"),
    (b'"one" "two"\n', ":1: a line starting with '\"' must be one JSON string"),
    (b"\n  \n", " holds no prompt (only empty lines)"),
]


@program_jobs
def generate_user_errors_are_one_named_line_jobs(inputs):
    directory, tmp_path = inputs.checkpoint, inputs.folder
    jobs, expected = [], []
    for args, status, message in FLAG_ERRORS:
        jobs.append(("generate.py", [f"--checkpoint={directory}", "--prompt=Hi", *args], ""))
        expected.append((status, lambda line, m=message: line.startswith(m)))
    # The checkpoint does not exist: the --output error comes first, so it is checked first.
    missing = str(tmp_path / "missing")
    no_dir = tmp_path / "no_dir" / "out.jsonl"
    for output, message in [(no_dir, f"error: {no_dir}: No such file or directory"),
                            (tmp_path, f"error: --output={tmp_path} is a directory; expected a "
                                       f"file path")]:
        jobs.append(("generate.py", [f"--checkpoint={missing}", "--prompt=Hi",
                                     f"--output={output}"], ""))
        expected.append((1, lambda line, m=message: line == m))
    # --output naming the --prompts_file would destroy the prompts.
    kept = tmp_path / "kept.txt"
    kept.write_text("a prompt\n")
    jobs.append(("generate.py", [f"--checkpoint={missing}", f"--prompts_file={kept}",
                                 f"--output={kept}"], ""))
    expected.append((1, lambda line: line == f"error: --output={kept} is the --prompts_file: "
                                            f"writing would destroy the prompts; choose another "
                                            f"path"))
    for number, (content, message) in enumerate(PROMPTS_FILE_ERRORS):
        prompts = tmp_path / f"prompts{number}.txt"
        prompts.write_bytes(content)
        jobs.append(("generate.py", [f"--checkpoint={missing}", f"--prompts_file={prompts}"], ""))
        expected.append((1, lambda line, p=str(prompts), m=message:
                         line.startswith("error: ") and p in line and m in line))
    return jobs, (expected, kept)


def test_generate_user_errors_are_one_named_line(program_results):
    """Flag errors name the flag; --output is checked before any work; --prompts_file errors
    name the file and line."""
    results, (expected, kept) = program_results["generate_user_errors_are_one_named_line"]
    for result, (status, check) in zip(results, expected, strict=True):
        job = result.args
        assert result.returncode == status, (job, result.stderr[-3000:])
        assert check(last_error_line(result)), (job, result.stderr[-3000:])
        # Nothing else on stderr: no orbax / JAX INFO chatter before the error at the default
        # log level, even where the checkpoint was loaded.
        assert len(result.stderr.strip().splitlines()) == 1, (job, result.stderr[-3000:])
        assert "=== prompt" not in result.stdout, job
    assert kept.read_text() == "a prompt\n"


@program_jobs
def chat_skips_a_message_that_is_not_utf8_jobs(inputs):
    return [("chat.py", [f"--checkpoint={inputs.checkpoint}"], "ab\udcffc\n")], None


def test_chat_skips_a_message_that_is_not_utf8(program_results):
    (result,), _ = program_results["chat_skips_a_message_that_is_not_utf8"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "error: stdin line 1 is not UTF-8 text (invalid start byte at byte 2); message skipped"]


@program_jobs
def chat_drops_the_oldest_turns_jobs(inputs):
    # max_sequence_length 128 - gen_length 16: 112 prompt tokens. Each turn below takes about
    # 60 of them, so from the third message on the oldest turns must go; a message longer than
    # 112 tokens on its own is refused, and the chat goes on.
    messages = ["tell me more about it please, now"] * 4 + ["y" * 120, "bye"]
    return [("chat.py", [f"--checkpoint={inputs.checkpoint}", "--seed=1"],
             "\n".join(messages) + "\n")], None


def test_chat_drops_the_oldest_turns(program_results):
    (result,), _ = program_results["chat_drops_the_oldest_turns"]
    stdout = program_stdout(result)
    lines = stdout.splitlines()
    assert len([line for line in lines if line.startswith("assistant: ")]) == 5, stdout
    assert len([line for line in lines if line.startswith("(the conversation outgrew")]) == 1
    refused = [line for line in lines if line.startswith("error: ")]
    assert len(refused) == 1 and "the message is too long" in refused[0], stdout
    assert "max_sequence_length" not in stdout.replace(refused[0], "")


CONVERSATION_CHECK = """
import sys
sys.path.insert(0, "launch")
from chat import Conversation
from llada_jax.data.tokenizer import CharTokenizer

tokenizer = CharTokenizer()
conversation = Conversation(tokenizer, system="be brief")
turns = [("question number %d" % i, "answer %d" % i) for i in range(6)]
for question, answer in turns:
    conversation.messages += [{"role": "user", "content": question},
                              {"role": "assistant", "content": answer}]
conversation.messages.append({"role": "user", "content": "last one"})
limit = int(sys.argv[1])
ids, dropped = conversation.fit(limit)
print(len(ids), dropped, [m["content"] for m in conversation.messages])
"""


def test_conversation_fit_keeps_the_newest_turns_that_fit():
    from llada_jax.data.tokenizer import CharTokenizer

    tokenizer = CharTokenizer()
    system = [{"role": "system", "content": "be brief"}]
    turns = [[{"role": "user", "content": f"question number {i}"},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(6)]
    last = [{"role": "user", "content": "last one"}]
    # Independently: the most recent whole turns whose rendering (system message kept) fits.
    limit = 100
    for kept in range(6, -1, -1):
        messages = system + [m for turn in turns[6 - kept:] for m in turn] + last
        ids = tokenizer.render_chat(messages, add_generation_prompt=True)
        if len(ids) <= limit:
            break
    assert 0 < kept < 6   # the limit makes some, not all, turns go
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", CONVERSATION_CHECK, str(limit)], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split(" ", 2)[:2] == [str(len(ids)), str(6 - kept)]
    assert result.stdout.split(" ", 2)[2].strip() == str([m["content"] for m in messages])


@pytest.fixture(scope="module")
def llada_v_checkpoint(tmp_path_factory):
    """Randomly initialised params of the tiny LLaDA-V preset (one layer each: only the config's
    vision section matters here)."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import llada_v_tiny
    finally:
        sys.path.pop(0)
    from llada_jax.train.state import make_model

    config = llada_v_tiny.get_config()
    config.model.n_layers, config.vision.n_layers = 1, 2
    model = make_model(config)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"])
    directory = str(tmp_path_factory.mktemp("ckpt") / "llada_v")
    save_params(directory, config, params)
    return directory


@program_jobs
def llada_v_checkpoint_without_image_warns_jobs(inputs):
    checkpoint = inputs.llada_v_checkpoint
    return [("chat.py", [f"--checkpoint={checkpoint}"], ""),
            ("generate.py", [f"--checkpoint={checkpoint}", "--prompt=Colour?", "--gen_length=4",
                             "--block_length=4", "--steps=4"], "")], None


def test_llada_v_checkpoint_without_image_warns(llada_v_checkpoint, program_results):
    warning = (f"warning: --checkpoint={llada_v_checkpoint} is a LLaDA-V checkpoint "
               f"(vision.enabled) and no image is given: the answers come from the text alone")
    (chat, generate), _ = program_results["llada_v_checkpoint_without_image_warns"]
    assert chat.returncode == 0, chat.stderr[-3000:]
    # The warning is all there is on stderr (no INFO logs of orbax loading the checkpoint).
    (line,) = chat.stderr.strip().splitlines()
    assert line.startswith(warning), chat.stderr
    assert generate.returncode == 0 and warning in generate.stderr, generate.stderr[-3000:]
    assert "=== prompt 0: Colour?" in generate.stdout


@program_jobs
def chat_help_documents_the_commands_jobs(inputs):
    return [("chat.py", ["--help"], "")], None


def test_chat_help_documents_the_commands(program_results):
    (result,), _ = program_results["chat_help_documents_the_commands"]
    assert result.returncode == 1, result.stderr[-3000:]   # absl's --help exits with 1
    for documented in ("/reset", "/quit", "oldest turns", "are dropped", "--verbose"):
        assert documented in result.stdout, documented
