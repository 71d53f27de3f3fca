"""launch/train.py as a user runs it: a subprocess, or forked children of one process that
imported the libraries once (tests/test_program_runner.py `run_programs`)."""

import os
import struct
import subprocess
import sys

import pytest

from llada_jax.train import summary
from tests.test_program_runner import one_device_xla_flags, run_programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(program, *args, timeout=240):
    env = dict(os.environ)
    env["XLA_FLAGS"] = one_device_xla_flags()  # one CPU device: quicker than 8 fake ones
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", program), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _read_tfrecords(path):
    """Payloads of a TFRecord file, checking both CRCs of every record."""
    data = open(path, "rb").read()
    records, offset = [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        payload = data[offset + 12:offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert length_crc == summary.masked_crc32c(header)
        assert payload_crc == summary.masked_crc32c(payload)
        records.append(payload)
        offset += 16 + length
    return records


def test_crc32c_standard_check_value():
    # The CRC-32C (Castagnoli) check value of "123456789" is 0xE3069283 (RFC 3720, B.4).
    assert summary.crc32c(b"123456789") == 0xE3069283


def test_train_end_to_end_then_resume(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["--config=configs/tiny.py:quick", f"--workdir={workdir}", "--config.train.steps=4",
            "--config.train.log_every=2", "--config.train.eval_every=2",
            "--config.train.eval_batches=1", "--config.train.checkpoint_every=0"]
    result = _run("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/4 | loss" in result.stderr and "step 4/4 | loss" in result.stderr
    assert "eval at step 4" in result.stderr
    assert "orbax" not in result.stderr  # library INFO chatter is filtered
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    payloads = _read_tfrecords(os.path.join(workdir, "tensorboard", events[0]))
    assert b"brain.Event:2" in payloads[0]
    assert sum(b"train/loss" in p for p in payloads) == 4  # one per step
    assert any(b"eval/loss" in p for p in payloads)

    # Same workdir, more steps: resumes at step 4. Then once more (in the same run_programs
    # call: the second run's checks below hold after the third, which writes nothing).
    result, again = run_programs(
        [("train.py", [*args[:2], "--config.train.steps=6", "--config.train.log_every=2",
                       "--config.train.eval_every=0"], ""),
         ("train.py", [*args[:2], "--config.train.steps=6"], "")],
        tmp_path / "programs", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "at step 4" in result.stderr
    assert "step 6/6 | loss" in result.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]

    # Once more: the run is complete, says so (where, at which step) and exits 0.
    result = again
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"training already complete: step 6 of 6, checkpoint {workdir}/checkpoints/6"
            in result.stderr)
    assert "step 7/" not in result.stderr


BAD_FLAGS = [
    ("--config.train.steps=-3", "error: config.train.steps: expected a positive integer, "
                                "found -3"),
    ("--config.train.schedule=linear", "error: config.train.schedule: expected one of"),
    ("--config.train.steps=many", "error: flag --config.train.steps=many:"),
    ("--config.train.no_such_field=1", "error: unknown config field 'no_such_field'"),
    # Before: `unknown config field '\\'learnig_rate\\'\\nDid you mean...` (an escaped repr).
    ("--config.train.learnig_rate=1", "error: unknown config field 'learnig_rate' in "
                                      "--config.train.learnig_rate; did you mean "
                                      "'learning_rate'? (fields are listed in "),
    # Before: the error named mesh.fsdp (-1 by default), not the axis the user set.
    ("--config.mesh.data=3", "error: config.mesh: data=3 * tensor=1 = 3 does not divide the 1 "
                             "devices (mesh.fsdp=-1 takes the rest); found mesh.data=3, "
                             "mesh.fsdp=-1, mesh.tensor=1"),
    ("--config.mesh.tensor=-1", "error: config.mesh: at most one axis may be -1"),
    ("--config.model.mask_token_id=5", "error: config.model.mask_token_id: expected 3"),
    ("--no_such_flag=1", "error: Unknown command line flag 'no_such_flag'"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    """{flag: (its empty workdir, the result of train.py with it)}: every case of
    test_bad_flags_give_one_line_errors in one run_programs call."""
    flags = [flag for flag, _ in BAD_FLAGS]
    workdirs = [tmp_path_factory.mktemp("bad_flag") for _ in flags]
    results = run_programs(
        [("train.py", ["--config=configs/tiny.py", f"--workdir={workdir}", flag], "")
         for flag, workdir in zip(flags, workdirs, strict=True)],
        tmp_path_factory.mktemp("programs"), timeout=600)
    return dict(zip(flags, zip(workdirs, results, strict=True), strict=True))


@pytest.mark.parametrize("flag,message", BAD_FLAGS)
def test_bad_flags_give_one_line_errors(bad_flag_runs, flag, message):
    workdir, result = bad_flag_runs[flag]
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message), lines[0]
    assert not os.listdir(workdir)  # nothing was started
