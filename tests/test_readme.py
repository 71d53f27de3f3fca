"""Every shell command in the README's ```bash blocks is run or checked, so the README stays true.

The commands are extracted from README.md (continuation lines joined, comments dropped) and each
one must be listed in `EXAMPLES` below, with how it is checked; a new README command that is not
listed, or a listed one that left the README, fails `test_every_readme_command_is_checked`.

* `run`: run with bash as written, from the repository root, on one CPU device. The README's
  placeholder paths (/tmp/..., /ckpt/..., mmlu.jsonl) are replaced by directories of this test.
  Where `/ckpt/llada_jax` (an imported 8B checkpoint) appears, the tiny SFT run stands in for it.
  Training runs get `--config.train.steps=N` appended (the only change to their text) to fit
  the test budget; the tiny pre-training example of the Configuration section runs verbatim
  (50 steps) and the quick start then resumes that finished run.
* `flags`: commands that need real weights, cloud storage or long training: the program parses
  the command line (every flag and `--config.*` override must exist and parse; for train.py the
  resulting config is also validated) without running. Paths are not touched by parsing.
* `dry_run`: launch/tpu_pod.py commands run with `--dry_run`, which prints the gcloud calls.
* `not_run`: the reason is given (installation steps; the test suite itself).

Checkpoints are made once per module and shared by the cases; the whole file takes about a
minute of CPU time.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.test_program_runner import one_device_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_STEPS = 50   # the Configuration example's own --config.train.steps=50
SFT_STEPS = 4     # the SFT example: a checkpoint the programs can load (none needs it trained)

# README command (exact, after joining continuations and dropping comments) -> how it is checked.
EXAMPLES = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python launch/train.py "
    "--config=configs/tiny.py --workdir=/tmp/llada_tiny":
        ("run_last", "the venv and pip steps are what .ci/run does; the training command runs"),
    'pip install -e ".[test]" && python -m pytest -q -n 3 tests':
        ("not_run", "this is the test suite itself (.ci/run runs it in a fresh environment)"),
    "python launch/train.py --config=configs/tiny.py --config.train.steps=50 "
    "--config.mesh.fsdp=-1 --workdir=/tmp/run":
        ("run", "the tiny pre-training run (fixture tiny_workdir)"),
    "python launch/train.py --config=configs/tiny.py --workdir=/tmp/llada_tiny":
        ("run", "resumes the finished 50-step run"),
    "python launch/train.py --config=configs/sft_tiny.py --workdir=/tmp/llada_sft":
        ("run", "the tiny SFT run (fixture sft_workdir)"),
    "python launch/train.py --config=configs/sft.py:/ckpt/LLaDA-8B-Base "
    "--config.data.source='files:/data/chats/*.jsonl' --config.train.init_from=/ckpt/llada_jax "
    "--workdir=gs://bucket/runs/sft":
        ("flags", "8B SFT: needs the released tokenizer, weights and cloud storage"),
    "python launch/train_tokenizer.py --source='files:/data/corpus/*.txt' --vocab_size=32000 "
    "--output=/data/sp.model":
        ("flags", "needs a corpus large enough for 32000 pieces (tests/test_tokenizer_sp.py "
                  "trains small ones)"),
    "python launch/generate.py --checkpoint=/tmp/llada_tiny --prompt='add: 3 + 4 = ' "
    "--gen_length=64 --block_length=32 --steps=64":
        ("run", "on the tiny pre-training run"),
    "python launch/generate.py --checkpoint=/ckpt/llada_jax --chat --prompt='Explain diffusion "
    "LMs.' --cache=dual --threshold=0.9 --early_exit":
        ("run", "the tiny SFT run stands in for the imported 8B Instruct checkpoint"),
    "printf 'Uppercase hat\\n/reset\\nReverse sun\\n' | python launch/chat.py "
    "--checkpoint=/tmp/llada_sft":
        ("run", "on the tiny SFT run"),
    "python launch/evaluate.py --checkpoint=/ckpt/llada_jax --data=mmlu.jsonl --mc_num=1 "
    "--mc_batch_size=1":
        ("run", "on the tiny SFT run, with a two-question multiple-choice file"),
    "python launch/train.py --config=configs/llada_v_tiny.py --workdir=/tmp/llada_v":
        ("flags", "two minutes of training; tests/test_llada_v_launch.py trains and chats with "
                  "it end to end"),
    "python launch/chat.py --checkpoint=/tmp/llada_v --image=shape.png":
        ("flags", "needs the LLaDA-V run above; tests/test_llada_v_launch.py runs it"),
    "python launch/train.py --config=configs/llada_v.py:stage1 "
    "--config.data.source='files:/data/llava/*.json' --config.data.image_folder=/data/llava/images "
    "--workdir=gs://bucket/runs/llada_v_s1":
        ("flags", "LLaDA-V 8B: needs the released weights, LLaVA data and cloud storage"),
    "python launch/train.py --config=configs/moe_tiny.py --workdir=/tmp/llada_moe":
        ("flags", "tests/test_moe_training.py pre-trains the tiny MoE (sharded over fsdp x "
                  "expert as well)"),
    'pip install -e ".[serve]"':
        ("not_run", "an installation step (the test extra includes the serve packages)"),
    "python launch/serve.py --checkpoint=/tmp/llada_sft --port=8000":
        ("flags", "a server runs until stopped; tests/test_serve.py starts it on a free port "
                  "and talks to it with the openai client"),
    "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d "
    "'{\"model\": \"llada_sft\", \"messages\": [{\"role\": \"user\", \"content\": "
    "\"Uppercase hat\"}], \"max_tokens\": 16}'":
        ("not_run", "needs the server above; tests/test_serve.py sends the same requests"),
    "python launch/convert.py --mode=import --hf_dir=/ckpt/LLaDA-8B-Instruct "
    "--out=/ckpt/llada_jax":
        ("run", "imports the export of the tiny SFT run (made by the export example)"),
    "python launch/convert.py --mode=export --checkpoint=/tmp/llada_sft --out=/ckpt/hf_export "
    "--naming=llada --dtype=bfloat16":
        ("run", "exports the tiny SFT run"),
    "python launch/tpu_pod.py create --tpu=NAME --zone=ZONE --accelerator_type=v5p-64 [--spot]":
        ("dry_run", "with and without the optional --spot"),
    "python launch/tpu_pod.py install --tpu=NAME --zone=ZONE":
        ("dry_run", ""),
    "python launch/tpu_pod.py train --tpu=NAME --zone=ZONE --config=configs/llada_8b.py:/data/tok "
    "--workdir=gs://BUCKET/run --detach -- --config.train.steps=100000":
        ("dry_run", ""),
    "python launch/tpu_pod.py resume ...the same flags...":
        ("dry_run", "with the flags of the train example"),
    "python launch/tpu_pod.py export --tpu=NAME --zone=ZONE --workdir=gs://BUCKET/run "
    "--export_dir=gs://BUCKET/run_hf":
        ("dry_run", ""),
    "python launch/tpu_pod.py delete --tpu=NAME --zone=ZONE":
        ("dry_run", ""),
}


def readme_commands() -> list[str]:
    """The README's bash commands, one per logical line: continuation lines joined, a trailing
    `  # comment` dropped, runs of spaces made one (the README's quoted strings hold none)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if line:
                commands.append(line)
    return commands


def test_every_readme_command_is_checked():
    commands = readme_commands()
    assert len(commands) >= 20, commands
    unlisted = [c for c in commands if c not in EXAMPLES]
    assert not unlisted, f"README commands with no check in EXAMPLES: {unlisted}"
    stale = [c for c in EXAMPLES if c not in commands]
    assert not stale, f"EXAMPLES no longer in the README: {stale}"
    for command, (how, reason) in EXAMPLES.items():
        assert how in ("run", "run_last", "flags", "dry_run", "not_run"), command
        assert how not in ("flags", "not_run") or reason, command


def _env():
    # One CPU device (a quick start), and `python` being this interpreter, as in the venv.
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=one_device_xla_flags(),
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


# Hang guards, not speed tests: a helper's run at load ~18 hit the former 300 s on a command
# that takes about 30 s on an idle box.
HANG_GUARD_SECONDS = 900


def run_command(command: str, paths: dict[str, str], append: str = "",
                timeout: int = HANG_GUARD_SECONDS) -> subprocess.CompletedProcess:
    """Runs a README command with bash from the repository root, placeholder paths replaced."""
    assert command in EXAMPLES, command
    for placeholder, path in paths.items():
        command = command.replace(placeholder, path)
    result = subprocess.run(["bash", "-c", command + append], capture_output=True, text=True,
                            env=_env(), cwd=ROOT, timeout=timeout, check=False)
    assert result.returncode == 0, f"{command}{append}\n{result.stderr[-3000:]}"
    return result


def _example(prefix: str) -> str:
    matches = [c for c in EXAMPLES if c.startswith(prefix)]
    assert len(matches) == 1, (prefix, matches)
    return matches[0]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """The Configuration section's example, verbatim: 50 steps of the tiny preset."""
    workdir = str(tmp_path_factory.mktemp("readme") / "llada_tiny")
    run_command(_example("python launch/train.py --config=configs/tiny.py --config.train.steps"),
                {"/tmp/run": workdir})
    return workdir


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("readme") / "llada_sft")
    run_command(_example("python launch/train.py --config=configs/sft_tiny.py"),
                {"/tmp/llada_sft": workdir}, append=f" --config.train.steps={SFT_STEPS}")
    return workdir


def test_quick_start_and_training_commands(tiny_workdir):
    # The quick start's training command (after its installation steps) is also the Training
    # section's first example: on the finished 50-step run it resumes and has nothing left to do.
    quick_start = _example("python3 -m venv")
    command = quick_start.split(" && ")[-1]
    assert command == _example("python launch/train.py --config=configs/tiny.py --workdir=")
    run_command(command, {"/tmp/llada_tiny": tiny_workdir},
                append=f" --config.train.steps={TINY_STEPS}")


def test_generate_example_on_the_tiny_run(tiny_workdir):
    result = run_command(_example("python launch/generate.py --checkpoint=/tmp/llada_tiny"),
                         {"/tmp/llada_tiny": tiny_workdir})
    assert "=== prompt 0: add: 3 + 4 = " in result.stdout
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["prompts"] == 1 and stats["generated_tokens"] == 64
    assert stats["forward_passes"] == 64    # --steps=64: one pass per step


def test_the_generate_prompt_is_in_the_corpus_format():
    # The built-in corpus writes an addition as "add: A + B = SUM." on a line of its own; the
    # README's prompt must be such a line without its answer.
    from llada_jax.data.synthetic import SyntheticTextSource

    source = SyntheticTextSource(size=300)
    lines = [line for i in range(len(source)) for line in source[i]["text"].splitlines()]
    additions = [line for line in lines if line.startswith("add")]
    assert additions
    for line in additions:
        a, b, total = re.fullmatch(r"add: (\d+) \+ (\d+) = (\d+)\.", line).groups()
        assert int(a) + int(b) == int(total)
    command = _example("python launch/generate.py --checkpoint=/tmp/llada_tiny")
    prompt = shlex.split(command)[3].removeprefix("--prompt=")
    a, b = re.fullmatch(r"add: (\d+) \+ (\d+) = ", prompt).groups()
    assert re.fullmatch(r"add: (\d+) \+ (\d+) = (\d+)\.", f"{prompt}{int(a) + int(b)}.")


def _readme_text() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_the_prompts_the_readme_suggests_match_the_built_in_data():
    from llada_jax.data.synthetic import SyntheticTextSource
    from llada_jax.data.synthetic_chat import split_of, task_question_answer

    text = " ".join(_readme_text().split())
    corpus = re.search(r"Prompts for the tiny pre-trained model follow its built-in corpus \((.*?)"
                       r"; see", text).group(1)
    prompts = re.findall(r"`([^`]*)`", corpus)
    assert len(prompts) >= 3, corpus
    source = SyntheticTextSource(size=3000)
    lines = [line for i in range(len(source)) for line in source[i]["text"].splitlines()]
    for prompt in prompts:
        # The same line shape: any number where the prompt has one, any word to copy/reverse.
        shape = re.sub(r"\d+", r"\\d+", re.escape(prompt))
        shape = re.sub(r"(reverse|copy)\\ [a-z]+", r"\1\\ [a-z]+", shape)
        assert any(re.match(shape, line) for line in lines), prompt
    chat = re.search(r"the tiny SFT model answers the built-in chat tasks \((.*?)\)", text).group(1)
    questions = re.findall(r"`([^`]*)`", chat)
    assert len(questions) == 3 and "these three are held-out questions" in chat
    for question in questions:
        assert split_of(question) == "test", question
        task, word = question.rsplit(" ", 1)
        task = {"Uppercase": "uppercase", "Reverse": "reverse", "Last letter of": "last",
                "First letter of": "first", "Repeat": "repeat"}[task]
        assert task_question_answer(task, word)[0] == question
    assert all(q in _example("printf") for q in questions[:2])


def test_fast_sampling_generate_example(sft_workdir):
    result = run_command(_example("python launch/generate.py --checkpoint=/ckpt/llada_jax"),
                         {"/ckpt/llada_jax": sft_workdir})
    assert "=== prompt 0: Explain diffusion LMs." in result.stdout
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["forward_passes"] >= 1


def test_chat_example(sft_workdir):
    result = run_command(_example("printf"), {"/tmp/llada_sft": sft_workdir})
    lines = result.stdout.splitlines()
    assert "(new conversation)" in lines
    assert len([line for line in lines if line.startswith("assistant: ")]) == 2, result.stdout


def test_evaluate_example(sft_workdir, tmp_path):
    data = tmp_path / "mmlu.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Uppercase hat", "choices": ["HAT", "hat"], "label": 0},
        {"question": "Reverse sun", "choices": ["nus", "sun"], "label": 0}]))
    result = run_command(_example("python launch/evaluate.py"),
                         {"/ckpt/llada_jax": sft_workdir, "mmlu.jsonl": str(data)})
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["multiple_choice"]["records"] == 2
    assert 0 <= summary["multiple_choice"]["accuracy"] <= 1


def test_convert_examples_round_trip(sft_workdir, tmp_path):
    exported, imported = str(tmp_path / "hf_export"), str(tmp_path / "llada_jax")
    run_command(_example("python launch/convert.py --mode=export"),
                {"/tmp/llada_sft": sft_workdir, "/ckpt/hf_export": exported})
    assert os.path.isfile(os.path.join(exported, "config.json"))
    run_command(_example("python launch/convert.py --mode=import"),
                {"/ckpt/LLaDA-8B-Instruct": exported, "/ckpt/llada_jax": imported})
    assert os.listdir(imported)


# Parses command lines with each program's own flags (and flags_parser, for train.py) instead
# of running them: absl's app.run is replaced before the program file runs as __main__. The
# libraries are imported once; each command line is parsed in a forked child (fresh flags).
PARSE_ONLY = """
import json, os, runpy, sys
from absl import app, flags
import llada_jax.config, llada_jax.diffusion.sampler, llada_jax.train.checkpoint  # shared imports

def parse_only(main, argv=None, flags_parser=None):
    (flags_parser or flags.FLAGS)(sys.argv if argv is None else argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        llada_jax.config.validate(flags.FLAGS["config"].value)
    print("flags parse", flush=True)
    os._exit(0)

sys.path.insert(0, "launch")
for argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        app.run = parse_only
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
        os._exit(3)   # the program ran past flag parsing
    print(json.dumps({"argv": argv, "status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}),
          flush=True)
"""


def test_flags_of_examples_that_need_real_weights_or_clouds():
    commands = [shlex.split(c) for c, (how, _) in EXAMPLES.items() if how == "flags"]
    assert all(argv[0] == "python" for argv in commands)
    result = subprocess.run([sys.executable, "-c", PARSE_ONLY,
                             json.dumps([argv[1:] for argv in commands])],
                            capture_output=True, text=True, env=_env(), cwd=ROOT,
                            timeout=HANG_GUARD_SECONDS,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    reports = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["argv"] for r in reports] == [argv[1:] for argv in commands]
    failed = [r["argv"] for r in reports if r["status"] != 0]
    assert not failed, (failed, result.stderr[-2000:])
    assert lines.count("flags parse") == len(commands)


def _tpu_pod_variants(command: str) -> list[list[str]]:
    train = _example("python launch/tpu_pod.py train")
    if "...the same flags..." in command:
        command = command.replace("...the same flags...", train.split(" train ", 1)[1])
    if "[--spot]" in command:
        return [_tpu_pod_variants(command.replace(" [--spot]", variant))[0]
                for variant in ("", " --spot")]
    argv = shlex.split(command)
    cut = argv.index("--") if "--" in argv else len(argv)
    return [[*argv[:cut], "--dry_run", *argv[cut:]]]   # --dry_run must come before `--`


@pytest.mark.parametrize("command", [c for c, (how, _) in EXAMPLES.items() if how == "dry_run"])
def test_tpu_pod_examples_dry_run(command):
    for argv in _tpu_pod_variants(command):
        result = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                                env=_env(), cwd=ROOT, timeout=HANG_GUARD_SECONDS, check=False)
        assert result.returncode == 0, (argv, result.stderr[-2000:])
        printed = result.stdout.strip().splitlines()
        assert printed and all(line.startswith("gcloud ") for line in printed), result.stdout
        if "--spot" in argv:
            assert "--spot" in result.stdout
