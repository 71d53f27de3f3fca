"""LLaDA-V through the launch programs, as a user runs them (subprocesses): train the tiny preset
with launch/train.py, then ask launch/chat.py --image about pictures it has never seen.

The programs run as forked children of one process (`run_programs`): each has its own stdin,
stdout, stderr and flags, as a user's run, but JAX, flax and orbax are imported once per batch.
The tests that only need *a* LLaDA-V checkpoint (image errors, export / import) use a random one
written here, and run in one batch with the training error, so they do not wait for the
session's 500-step run."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from llada_jax.data.synthetic_images import draw_shape
from tests.test_program_runner import run_programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(llada_v_tiny_run):
    """The tiny preset trained for its 500 steps by launch/train.py (tests/conftest.py: built
    once per session, shared with tests/test_llada_v.py)."""
    return llada_v_tiny_run


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    """A params checkpoint (what launch/convert.py --mode=import writes) of configs/llada_v_tiny.py's
    model holding random values, for the tests whose programs never answer a question. The
    tree comes from `jax.eval_shape` of the model's init (traced, not compiled) and the values
    from numpy: no program is compiled for it."""
    import importlib.util

    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from llada_jax.train import state as state_lib
    from llada_jax.train.checkpoint import save_params

    spec = importlib.util.spec_from_file_location(
        "llada_v_tiny", os.path.join(ROOT, "configs", "llada_v_tiny.py"))
    preset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preset)
    config = preset.get_config()
    abstract = nn.unbox(jax.eval_shape(state_lib.make_model(config).init, jax.random.key(0),
                                       jnp.zeros((1, 2), jnp.int32)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(a.dtype), abstract)
    directory = str(tmp_path_factory.mktemp("llada_v_untrained") / "checkpoint")
    save_params(directory, config, params)
    return directory


def _picture(tmp_path, shape, colour, seed):
    path = str(tmp_path / f"{colour}_{shape}.png")
    Image.fromarray(draw_shape(shape, colour, 32, np.random.default_rng(seed))).save(path)
    return path


@pytest.fixture(scope="module")
def program_results(untrained_checkpoint, tmp_path_factory):
    """The runs of the tests that need no trained model, one `run_programs` batch (the jobs run
    in order: the import reads what the export wrote). Returns (their directory, {job: result})."""
    where = tmp_path_factory.mktemp("llada_v_programs")
    (where / "not_an_image.png").write_text("hello")
    (where / "llava.jsonl").write_text(json.dumps({"image": "nowhere.jpg", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    jobs = {
        "chat_missing_image": ("chat.py", [f"--checkpoint={untrained_checkpoint}",
                                           f"--image={where / 'missing.png'}"], ""),
        "chat_not_an_image": ("chat.py", [f"--checkpoint={untrained_checkpoint}",
                                          f"--image={where / 'not_an_image.png'}"], ""),
        "train_missing_image": ("train.py", ["--config=configs/llada_v_tiny.py:quick",
                                             f"--workdir={where / 'run'}",
                                             f"--config.data.source=files:{where / 'llava.jsonl'}"],
                                ""),
        "convert_export": ("convert.py", ["--mode=export", f"--checkpoint={untrained_checkpoint}",
                                          f"--out={where / 'hf'}", "--dtype=float32"], ""),
        "convert_import": ("convert.py", ["--mode=import", f"--hf_dir={where / 'hf'}",
                                          f"--out={where / 'back'}",
                                          "--config=configs/llada_v_tiny.py"], ""),
    }
    # The time limit is for all five together (each had 300 s alone).
    results = run_programs(list(jobs.values()), where / "programs", timeout=900)
    return where, dict(zip(jobs, results, strict=True))


def test_chat_image_errors(program_results):
    where, results = program_results
    not_found = results["chat_missing_image"]
    assert not_found.returncode != 0
    assert not_found.stderr.strip().splitlines()[-1] == f"error: --image: image file not " \
                                                        f"found: {where / 'missing.png'}"
    not_read = results["chat_not_an_image"]
    assert not_read.returncode != 0
    assert f"cannot read image {where / 'not_an_image.png'}" in not_read.stderr


def test_train_names_a_missing_image_of_the_data(program_results):
    where, results = program_results
    result = results["train_missing_image"]
    assert result.returncode != 0
    assert (f"{where / 'llava.jsonl'}:1: image file not found: {where / 'nowhere.jpg'}"
            in result.stderr)


def test_convert_exports_and_reimports_a_llada_v_checkpoint(untrained_checkpoint,
                                                            program_results):
    """launch/convert.py: LLaDA-V -> LLaDA-V Hugging Face layout -> our params, exactly."""
    import jax

    from llada_jax.train.checkpoint import load_params

    where, results = program_results
    exported, imported = results["convert_export"], results["convert_import"]
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "'llama' layout" in exported.stdout
    with open(where / "hf" / "model.safetensors.index.json") as f:
        keys = set(json.load(f)["weight_map"])
    assert {"model.mm_projector.0.weight", "model.image_newline",
            "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"} <= keys
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "+ the LLaDA-V vision tower and projector" in imported.stdout
    config, params = load_params(untrained_checkpoint)
    config_back, params_back = load_params(str(where / "back"))
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
        tmp_path / "programs", timeout=600)
    answers = {}
    for (colour, _), result in zip(pictures, results, strict=True):
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in result.stdout.splitlines() if line.startswith("assistant: ")]
        assert len(lines) == 2 and "(new conversation)" in result.stdout, result.stdout
        # After /reset the image is attached to the new first message again: same answer.
        assert lines[0] == lines[1]
        answers[colour] = lines[0][len("assistant: "):]
    assert answers == {"red": "red", "blue": "blue"}
