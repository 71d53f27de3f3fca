"""LLaDA-V through the launch programs, as a user runs them (subprocesses): train the tiny preset
with launch/train.py, then ask launch/chat.py --image about pictures it has never seen.

The programs of a test run as forked children of one process (`run_programs`): each has its own
stdin, stdout, stderr and flags, as a user's run, but JAX, flax and orbax are imported once. The
tests that only need *a* LLaDA-V checkpoint (image errors, export / import) use a random one
written here, so they do not wait for the session's 500-step run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llada_jax.data.synthetic_images import draw_shape
from tests.test_program_runner import run_programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name, *args, stdin=None, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device: quick start
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", name), *args],
                          input=stdin, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def checkpoint(llada_v_tiny_run):
    """The tiny preset trained for its 500 steps by launch/train.py (tests/conftest.py: built
    once per session, shared with tests/test_llada_v.py)."""
    return llada_v_tiny_run


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    """configs/llada_v_tiny.py's model with its random initial weights, as a params checkpoint
    (what launch/convert.py --mode=import writes): a LLaDA-V checkpoint for the tests whose
    programs never answer a question."""
    import importlib.util

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llada_jax.train import state as state_lib
    from llada_jax.train.checkpoint import save_params

    spec = importlib.util.spec_from_file_location(
        "llada_v_tiny", os.path.join(ROOT, "configs", "llada_v_tiny.py"))
    preset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preset)
    config = preset.get_config()
    model = state_lib.make_model(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    directory = str(tmp_path_factory.mktemp("llada_v_untrained") / "checkpoint")
    save_params(directory, config, jax.device_get(params["params"]))
    return directory


def _picture(tmp_path, shape, colour, seed):
    path = str(tmp_path / f"{colour}_{shape}.png")
    Image.fromarray(draw_shape(shape, colour, 32, np.random.default_rng(seed))).save(path)
    return path


def test_chat_image_errors(untrained_checkpoint, tmp_path):
    missing = str(tmp_path / "missing.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    not_found, not_read = run_programs(
        [("chat.py", [f"--checkpoint={untrained_checkpoint}", f"--image={image}"], "")
         for image in (missing, tmp_path / "not_an_image.png")], tmp_path / "programs")
    assert not_found.returncode != 0
    assert not_found.stderr.strip().splitlines()[-1] == f"error: --image: image file not " \
                                                        f"found: {missing}"
    assert not_read.returncode != 0
    assert f"cannot read image {tmp_path / 'not_an_image.png'}" in not_read.stderr


def test_train_names_a_missing_image_of_the_data(tmp_path):
    data = tmp_path / "llava.jsonl"
    data.write_text(json.dumps({"image": "nowhere.jpg", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    result = _run("train.py", "--config=configs/llada_v_tiny.py:quick",
                  f"--workdir={tmp_path / 'run'}", f"--config.data.source=files:{data}")
    assert result.returncode != 0
    assert f"{data}:1: image file not found: {tmp_path / 'nowhere.jpg'}" in result.stderr


def test_convert_exports_and_reimports_a_llada_v_checkpoint(untrained_checkpoint, tmp_path):
    """launch/convert.py: LLaDA-V -> LLaDA-V Hugging Face layout -> our params, exactly."""
    import jax

    from llada_jax.train.checkpoint import load_params

    checkpoint = untrained_checkpoint
    hf_dir, back_dir = str(tmp_path / "hf"), str(tmp_path / "back")
    # The import runs after the export (the jobs run in order) and reads its files.
    exported, imported = run_programs(
        [("convert.py", ["--mode=export", f"--checkpoint={checkpoint}", f"--out={hf_dir}",
                         "--dtype=float32"], ""),
         ("convert.py", ["--mode=import", f"--hf_dir={hf_dir}", f"--out={back_dir}",
                         "--config=configs/llada_v_tiny.py"], "")], tmp_path / "programs")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "'llama' layout" in exported.stdout
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        keys = set(json.load(f)["weight_map"])
    assert {"model.mm_projector.0.weight", "model.image_newline",
            "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"} <= keys
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "+ the LLaDA-V vision tower and projector" in imported.stdout
    config, params = load_params(checkpoint)
    config_back, params_back = load_params(back_dir)
    assert config_back.vision.enabled and config_back.vision.to_dict() == config.vision.to_dict()
    assert config_back.model.to_dict() == config.model.to_dict()
    original = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(params_back)[0]:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(original.pop(path)))
    assert not original  # nothing missing


# Last in the file: the other tests run while another xdist worker may still be training the
# session's checkpoint.
def test_chat_answers_about_the_image(checkpoint, tmp_path):
    pictures = (("red", "circle"), ("blue", "square"))
    results = run_programs(
        [("chat.py", [f"--checkpoint={checkpoint}",
                      f"--image={_picture(tmp_path, shape, colour, 123)}"],
          "Colour?\n/reset\nColour?\n") for colour, shape in pictures],
        tmp_path / "programs")
    answers = {}
    for (colour, _), result in zip(pictures, results, strict=True):
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in result.stdout.splitlines() if line.startswith("assistant: ")]
        assert len(lines) == 2 and "(new conversation)" in result.stdout, result.stdout
        # After /reset the image is attached to the new first message again: same answer.
        assert lines[0] == lines[1]
        answers[colour] = lines[0][len("assistant: "):]
    assert answers == {"red": "red", "blue": "blue"}
