"""Conversion faults: head_dim the layout cannot express, --overwrite, damaged payloads, I/O errors,
and the README round trip (import -> generate -> export) on a tiny checkpoint.

Checkpoints are written by the tests themselves (torch's safetensors writer for Hugging Face-style
files without checksums, or our export); damage is done by hand at byte offsets read from the
file's own header. The program tests run `launch/convert.py` / `launch/generate.py` as
subprocesses, or forked children of one process (tests/test_program_runner.py `run_programs`),
with a timeout (a hang fails the test) and check the single `error:` line.
"""

import dataclasses
import importlib.util
import json
import os
import struct
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llada_jax.config import ModelConfig
from llada_jax.interop import hf, llada_v, safetensors_io
from llada_jax.model.transformer import Transformer
from tests.interop_helpers import model_config_from_hf, read_safetensors
from tests.test_evaluate_tokenisation import write_bpe_tokenizer
from tests.test_interop import (
    BOS,
    EOS,
    HEADS,
    LAYERS,
    MASK,
    MLP,
    VOCAB,
    D,
    RefConfig,
    RefLLaDA,
    llama_config,
    load_exported_state,
    olmo_config,
    reference,
    save_checkpoint,
    to_llama_name,
)
from tests.test_program_runner import one_device_xla_flags, run_programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "mlp_hidden_size", "rope_theta", "rms_norm_eps", "max_sequence_length",
                "mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id")


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(0),
                                     jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


# ------------------------------------------------------------------------------------------
# head_dim other than d_model / n_heads (issue 11 item 12).

WIDE_HEADS = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                         n_kv_heads=2, head_dim=16, mlp_hidden_size=MLP, mask_token_id=MASK,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)


def test_llada_layout_refuses_head_dim_before_writing(tmp_path):
    params = random_params(WIDE_HEADS)
    out = tmp_path / "out"
    # The released config.json has no head_dim: d_model / n_heads = 8, not 16.
    with pytest.raises(ValueError, match=r"head_dim=16 with n_heads=4 and d_model=32 in the "
                                         r"'llada' layout.*--naming=llama"):
        hf.export_hf(params, WIDE_HEADS, str(out), naming="llada")
    assert os.listdir(tmp_path) == []


def test_llama_layout_records_head_dim_and_round_trips(tmp_path):
    params = random_params(WIDE_HEADS, seed=1)
    out = tmp_path / "out"
    hf.export_hf(params, WIDE_HEADS, str(out), naming="llama", dtype="float32")
    with open(out / "config.json") as f:
        written = json.load(f)
    assert (written["head_dim"], written["hidden_size"], written["num_attention_heads"]) == \
        (16, 32, 4)
    # PyTorch [out, in]: q_proj has n_heads * head_dim = 64 rows, k_proj 2 * 16 = 32.
    state = load_exported_state(out)
    assert tuple(state["model.layers.0.self_attn.q_proj.weight"].shape) == (64, 32)
    assert tuple(state["model.layers.0.self_attn.k_proj.weight"].shape) == (32, 32)
    assert tuple(state["model.layers.0.self_attn.o_proj.weight"].shape) == (32, 64)
    config_back, back = hf.import_hf(str(out))
    assert {f: getattr(config_back, f) for f in ARCHITECTURE} == \
        {f: getattr(WIDE_HEADS, f) for f in ARCHITECTURE}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, back)


def test_special_ids_outside_the_vocabulary_are_refused(tmp_path):
    config = dataclasses.replace(TEST_MODELS["test_interop"], bos_token_id=126080)
    with pytest.raises(ValueError, match=r"cannot export bos_token_id=126080: outside the "
                                         r"vocabulary \[0, 64\)"):
        hf.export_hf(random_params(config), config, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def preset_model(name: str, arg: str | None = None) -> ModelConfig:
    path = os.path.join(REPO, "configs", name + ".py")
    spec = importlib.util.spec_from_file_location(f"preset_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ModelConfig(**dict(module.get_config(arg).model))


PRESETS = ["llada_8b", "llada_1b", "llada_v", "sft", "tiny", "sft_tiny", "llada_v_tiny"]
# The tiny models the other test files build (their ModelConfig fields, copied here).
TEST_MODELS = {
    "test_likelihood": ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4,
                                   n_kv_heads=2, head_dim=8, mlp_hidden_size=64,
                                   rope_theta=10000.0, max_sequence_length=32, mask_token_id=15,
                                   eos_token_id=14, bos_token_id=1, pad_token_id=14),
    "test_sampler": ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=8, mlp_hidden_size=64, rope_theta=10000.0,
                                max_sequence_length=64, mask_token_id=47, eos_token_id=46,
                                bos_token_id=45, pad_token_id=46),
    # test_model.py leaves BOS/EOS/pad at LLaDA's ids, outside its 64-token vocabulary (export
    # refuses that, see below); in-vocabulary ids here.
    "test_model_mqa": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                                  head_dim=8, mlp_hidden_size=48, max_sequence_length=16,
                                  mask_token_id=63, eos_token_id=62, bos_token_id=61,
                                  pad_token_id=62),
    "test_multimodal": ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                                   n_kv_heads=2, head_dim=8, mlp_hidden_size=32,
                                   max_sequence_length=64, mask_token_id=3, eos_token_id=2,
                                   bos_token_id=1, pad_token_id=2),
    "test_interop": ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                                n_kv_heads=2, head_dim=D // HEADS, mlp_hidden_size=MLP,
                                mask_token_id=MASK, bos_token_id=BOS, eos_token_id=EOS,
                                pad_token_id=EOS),
}


@pytest.mark.parametrize("naming", ["llada", "llama"])
@pytest.mark.parametrize("name", PRESETS + list(TEST_MODELS))
def test_every_preset_and_test_model_round_trips_its_config(name, naming):
    config = TEST_MODELS[name] if name in TEST_MODELS else preset_model(name)
    # Every model the project ships or tests can be exported in either layout...
    assert config.n_heads * config.head_dim == config.d_model
    hf.check_exportable(config, naming)
    # ... and the written config.json describes exactly that architecture.
    written = hf.family_of(naming).hf_config_dict(config, naming, "bfloat16")
    written = json.loads(json.dumps(written))
    back = model_config_from_hf(written)
    assert {f: getattr(back, f) for f in ARCHITECTURE} == \
        {f: getattr(config, f) for f in ARCHITECTURE}


@pytest.mark.parametrize("name", ["tiny", "llada_v_tiny", *TEST_MODELS])
def test_tiny_models_round_trip_their_weights(tmp_path, name):
    config = TEST_MODELS[name] if name in TEST_MODELS else preset_model(name)
    params = random_params(config, seed=5)
    for naming in ("llada", "llama"):
        hf.export_hf(params, config, str(tmp_path / naming), naming=naming, dtype="float32")
        _, back = hf.import_hf(str(tmp_path / naming))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     params, back)


# ------------------------------------------------------------------------------------------
# --overwrite replaces only a previous export (issue 12 item 4).


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(TEST_MODELS["test_interop"], seed=2)


def test_overwrite_refuses_unrelated_files_and_replaces_an_export(tmp_path, tiny_params):
    config = TEST_MODELS["test_interop"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already exists \(pass --overwrite"):
        hf.export_hf(tiny_params, config, str(out))
    with pytest.raises(FileExistsError, match=r"refusing to overwrite .*not a previous export "
                                              r".*'notes.txt'"):
        hf.export_hf(tiny_params, config, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "my notes"
    assert [p for p in os.listdir(tmp_path)] == ["out"]   # nothing staged, nothing left

    # An empty directory is no loss: written into without --overwrite.
    empty = tmp_path / "empty"
    empty.mkdir()
    hf.export_hf(tiny_params, config, str(empty), dtype="float32")
    assert "config.json" in os.listdir(empty)
    # A previous export is replaced with --overwrite (bf16 now: the files change).
    hf.export_hf(tiny_params, config, str(empty), dtype="bfloat16", overwrite=True)
    with open(empty / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    # ... but not once something else was put into it.
    (empty / "results.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="'results.csv'"):
        hf.export_hf(tiny_params, config, str(empty), overwrite=True)
    assert (empty / "results.csv").read_text() == "1,2"


def test_llada_v_export_refuses_unrelated_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fake = {"language_model": {}, "vision_tower": {}, "projector": {}}
    with pytest.raises(FileExistsError, match="'keep.txt'"):
        llada_v.export_llada_v(fake, TEST_MODELS["test_interop"], None, str(out), overwrite=True)
    assert os.listdir(out) == ["keep.txt"]


# ------------------------------------------------------------------------------------------
# Damaged payloads (issue 12 item 5).


def tensor_offset(path, key: str) -> tuple[int, int, str]:
    """(absolute byte offset, byte length, dtype) of `key` in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    begin, end = header[key]["data_offsets"]
    return 8 + n + begin, end - begin, header[key]["dtype"]


def poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_changed_payload_fails_its_checksum(tmp_path, tiny_params):
    config = TEST_MODELS["test_interop"]
    out = tmp_path / "out"
    hf.export_hf(tiny_params, config, str(out), dtype="float32", max_shard_bytes=40_000)
    with open(out / hf.INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    key = "model.transformer.blocks.1.up_proj.weight"
    shard = out / weight_map[key]
    offset, _, _ = tensor_offset(shard, key)
    # Flip the lowest mantissa bit of the element 3: still a finite, plausible number.
    with open(shard, "rb") as f:
        f.seek(offset + 12)
        byte = f.read(1)[0]
    poke(shard, offset + 12, bytes([byte ^ 1]))
    with pytest.raises(ValueError, match=rf"shard file .*{weight_map[key]}: tensor '{key}' is "
                                         r"corrupted \(CRC-32"):
        hf.import_hf(str(out))


def test_non_finite_and_truncated_shards_are_named(tmp_path):
    state = reference(2, seed=4).state_dict()
    save_checkpoint(tmp_path, state, olmo_config(2))   # torch-written: no checksums
    with open(tmp_path / hf.INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    key = "model.transformer.blocks.0.q_proj.weight"
    shard = tmp_path / weight_map[key]
    offset, _, dtype = tensor_offset(shard, key)
    assert dtype == "F32"
    poke(shard, offset + 4 * 5, struct.pack("<f", float("nan")))   # element 5 = row 0, col 5
    with pytest.raises(ValueError, match=rf"shard file .*{weight_map[key]}: tensor '{key}' holds "
                                         r"a non-finite value \(nan at index \[0, 5\]\)"):
        hf.import_hf(str(tmp_path))
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(ValueError, match=rf"shard file .*{weight_map[key]} is damaged"):
        hf.import_hf(str(tmp_path))


def test_vision_reader_checks_size_checksum_and_finiteness(tmp_path):
    path = str(tmp_path / "v.safetensors")
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    safetensors_io.write_safetensors(path, [("w", np.dtype(np.float32), (3, 4), lambda: weights)])
    np.testing.assert_array_equal(read_safetensors(path)["w"], weights)
    offset, _, _ = tensor_offset(path, "w")
    poke(path, offset + 4, struct.pack("<f", 1.5))          # 1.0 -> 1.5
    with pytest.raises(ValueError, match=r"v\.safetensors: tensor 'w' is corrupted"):
        read_safetensors(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match=r"v\.safetensors is damaged: its header describes 48 "
                                         r"bytes of tensor data, the file holds 56"):
        read_safetensors(path)


# ------------------------------------------------------------------------------------------
# The programs: I/O errors are one line and never hang (issue 12 item 2); the README round trip.


def run_program(name: str, *args, max_file_kib: int | None = None, timeout: int = 240):
    """Runs launch/NAME; `max_file_kib`: writes past that size fail with EFBIG, as on a full
    disk (a file-size limit, which also holds for root; SIGXFSZ ignored so the write fails)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=one_device_xla_flags())
    command = [sys.executable, os.path.join(REPO, "launch", name), *args]
    if max_file_kib is not None:   # a shell sets the limit: no fork of this (JAX) process
        command = ["bash", "-c", f"trap '' XFSZ; ulimit -f {max_file_kib}; exec \"$@\"",
                   "limited", *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout, check=False)


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults") / "hf"
    save_checkpoint(directory, reference(2, seed=6).state_dict(), olmo_config(2))
    return directory


def test_import_into_an_unwritable_or_full_disk_is_one_line(tmp_path, hf_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    # --out below a regular file: orbax would fail in a background thread and hang; the
    # timeout of run_program turns a hang into a test failure.
    result = run_program("convert.py", "--mode=import", f"--hf_dir={hf_dir}",
                         f"--out={blocker}/out", timeout=120)
    assert_one_error_line(result, "Not a directory")
    # A full disk while orbax writes: one line, and nothing of the failed import is left.
    out = tmp_path / "full"
    result = run_program("convert.py", "--mode=import", f"--hf_dir={hf_dir}", f"--out={out}",
                         max_file_kib=8, timeout=120)
    assert_one_error_line(result, "cannot write the params checkpoint", str(out))
    assert not out.exists()


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, hf_dir):
    from llada_jax.config import default_config
    from llada_jax.train.checkpoint import save_params

    model, params = hf.import_hf(str(hf_dir))
    config = default_config()
    for name, value in dataclasses.asdict(model).items():
        config.model[name] = value
    ours = tmp_path / "ours"
    save_params(str(ours), config, params)
    exports = tmp_path / "exports"
    exports.mkdir()
    result = run_program("convert.py", "--mode=export", f"--checkpoint={ours}",
                         f"--out={exports / 'hf'}", "--dtype=float32",
                         max_file_kib=8, timeout=120)
    assert_one_error_line(result, "File too large")
    assert os.listdir(exports) == []   # the staging directory is gone


def test_readme_round_trip_import_generate_export(tmp_path):
    """README: import (no --config) -> generate -> export, on a tiny checkpoint with a tokenizer."""
    ref = reference(2, seed=9)
    hf_in = tmp_path / "hf"
    save_checkpoint(hf_in, {to_llama_name(k): v for k, v in ref.state_dict().items()},
                    llama_config(2), dtype=torch.bfloat16)
    write_bpe_tokenizer(hf_in)
    ours, exported = tmp_path / "ours", tmp_path / "exported"
    # The three programs one after another in forked children of one process that imported
    # the libraries once (each reads only what the one before it wrote).
    result, generated, export = run_programs(
        [("convert.py", ["--mode=import", f"--hf_dir={hf_in}", f"--out={ours}"], ""),
         ("generate.py", [f"--checkpoint={ours}", "--prompt=The cat", "--gen_length=8",
                          "--block_length=8", "--steps=8"], ""),
         ("convert.py", ["--mode=export", f"--checkpoint={ours}", f"--out={exported}",
                         "--naming=llada", "--dtype=bfloat16"], "")],
        tmp_path / "programs", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The 8B preset's gen_length 128 cannot fit max_sequence_length 64: fitted, and said so.
    assert "sampler settings fitted to the model: gen_length 128->32" in result.stdout

    from llada_jax.train.checkpoint import load_params
    config, _ = load_params(str(ours))
    assert config.data.tokenizer == f"hf:{hf_in}"
    assert (config.sampler.gen_length, config.sampler.block_length, config.sampler.steps) == \
        (32, 32, 32)
    assert config.sampler.eot_token_id == -1

    assert generated.returncode == 0, generated.stderr[-3000:]
    stats = json.loads(generated.stdout.strip().splitlines()[-1])
    assert isinstance(stats, dict)

    assert export.returncode == 0, export.stderr[-3000:]
    assert os.path.isfile(exported / "tokenizer.json")
    fresh = RefLLaDA(RefConfig(VOCAB, D, LAYERS, HEADS, 2, MLP, 500000.0, 1e-5))
    state = load_exported_state(exported)
    fresh.load_state_dict(state, strict=True)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value.to(torch.bfloat16), rtol=0, atol=0)



def test_llada_v_import_without_config_fits_the_preset(tmp_path):
    """A whole LLaDA-V checkpoint without --config: configs/llada_v.py's sampler, fitted (its
    banned EOS/BOS/header ids become the tokenizer's), and the image layout of config.json."""
    from llada_jax import config as config_lib
    from llada_jax.model.multimodal import LLaDAV
    from llada_jax.train.checkpoint import load_params

    spec = importlib.util.spec_from_file_location(
        "llada_v_tiny_preset", os.path.join(REPO, "configs", "llada_v_tiny.py"))
    preset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preset)
    c = preset.get_config()
    model_cfg, vision = config_lib.model_config(c), config_lib.vision_config(c)
    params = nn.unbox(jax.eval_shape(LLaDAV(model_cfg, vision).init, jax.random.key(0),
                                     jnp.zeros((1, 2), jnp.int32)))["params"]
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), params)
    hf_in = tmp_path / "hf"
    llada_v.export_llada_v(params, model_cfg, vision, str(hf_in), dtype="float32",
                          image_aspect_ratio="square", max_grid=3)
    write_bpe_tokenizer(hf_in)
    ours = tmp_path / "ours"
    result = run_program("convert.py", "--mode=import", f"--hf_dir={hf_in}", f"--out={ours}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "+ the LLaDA-V vision tower and projector" in result.stdout
    config, _ = load_params(str(ours))
    assert config.vision.enabled
    assert (config.vision.image_aspect_ratio, config.vision.max_grid) == ("square", 3)
    # configs/llada_v.py bans LLaDA's EOS, BOS and header ids; here: the tokenizer's 61, 59,
    # 62, 63 (tests/test_evaluate_tokenisation.py's table). The model's max length is 128.
    assert list(config.sampler.banned_ids) == [61, 59, 62, 63]
    assert config.sampler.stop_at_eot and config.sampler.gen_length == 64
