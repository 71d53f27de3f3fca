"""launch/tpu_pod.py: the exact gcloud invocations of every step of the TPU-VM pod journey.

The expected command lines are written out here by hand from gcloud's documented syntax
(`gcloud compute tpus tpu-vm create|scp|ssh|delete`, `gcloud storage rsync`) and
docs/tpu_pod.md. The program runs as a user runs it (a subprocess); for the real (not dry) path
a fake `gcloud` on PATH records what it is called with.
"""

import os
import shlex
import stat
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = ["--tpu=pod-1", "--zone=us-east5-a", "--project=proj"]
SSH_ALL = ("gcloud compute tpus tpu-vm ssh pod-1 --zone=us-east5-a --project=proj --worker=all "
           "'--command=")


def _run(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu_pod.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def _dry(*args):
    result = _run(*POD, "--dry_run", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_create_picks_the_jax_runtime_of_the_tpu_generation():
    assert _dry("create", "--accelerator_type=v5p-64", "--spot") == [
        "gcloud compute tpus tpu-vm create pod-1 --zone=us-east5-a --project=proj "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot"]
    assert _dry("create", "--accelerator_type=v5litepod-32") == [
        "gcloud compute tpus tpu-vm create pod-1 --zone=us-east5-a --project=proj "
        "--accelerator-type=v5litepod-32 --version=v2-alpha-tpuv5-lite"]
    assert _dry("create", "--accelerator_type=v4-32", "--runtime_version=my-image") == [
        "gcloud compute tpus tpu-vm create pod-1 --zone=us-east5-a --project=proj "
        "--accelerator-type=v4-32 --version=my-image"]


def test_install_copies_the_sources_then_builds_a_python_3_11_environment(tmp_path):
    upload = os.path.join(str(tmp_path), "llada_jax_pod_upload", "llada_jax")
    result = _run(*POD, "install", "--dry_run", env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    # scp into the home directory (the parent of --repo_dir): it merges into an existing copy.
    assert result.stdout.strip().splitlines() == [
        f"gcloud compute tpus tpu-vm scp --recurse {upload} pod-1:. --zone=us-east5-a "
        f"--project=proj --worker=all",
        SSH_ALL + "cd llada_jax && sudo apt-get update -qq && sudo apt-get install -y -qq "
        "python3.11 python3.11-venv && python3.11 -m venv .venv && .venv/bin/python -m pip "
        "install -q --upgrade pip && .venv/bin/python -m pip install -q -e "
        "'\"'\"'.[tpu]'\"'\"''"]
    assert not os.path.exists(upload)  # a dry run stages nothing


def test_install_from_a_git_url_clones_or_pulls():
    lines = _dry("install", "--repo_url=https://example.com/llada_jax.git", "--python=python3")
    assert lines[0] == SSH_ALL + (
        "if [ -d llada_jax ]; then git -C llada_jax pull --ff-only; else git clone --depth=1 "
        "https://example.com/llada_jax.git llada_jax; fi'")
    # An interpreter of the user's choice: no virtual environment is made.
    assert lines[1].startswith(SSH_ALL + "cd llada_jax && python3 -m pip install -q --upgrade "
                                         "pip && python3 -m pip install -q -e ")


def test_train_and_resume_run_the_same_command_on_every_worker():
    args = ["--config=configs/llada_8b.py:/data/tok", "--workdir=gs://bucket/run",
            "--env=LIBTPU_INIT_ARGS=--xla_tpu_foo", "--", "--config.train.steps=10"]
    expected = [SSH_ALL + "cd llada_jax && env LLADA_JAX_DISTRIBUTED=1 "
                "LIBTPU_INIT_ARGS=--xla_tpu_foo .venv/bin/python "
                "launch/train.py --config=configs/llada_8b.py:/data/tok "
                "--workdir=gs://bucket/run --config.train.steps=10'"]
    assert _dry("train", *args) == expected
    assert _dry("resume", *args) == expected
    assert _dry(*args) == expected  # train is the default action


def test_detached_training_outlives_the_ssh_session_and_logs_to_a_file():
    assert _dry("train", "--workdir=gs://bucket/run", "--detach") == [
        SSH_ALL + "cd llada_jax && nohup env LLADA_JAX_DISTRIBUTED=1 .venv/bin/python "
        "launch/train.py "
        "--config=configs/tiny.py --workdir=gs://bucket/run > $HOME/llada_jax_train.log 2>&1 "
        "< /dev/null &'"]
    assert _dry("logs", "--log_lines=20") == [
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-east5-a --project=proj --worker=0 "
        "'--command=tail -n 20 $HOME/llada_jax_train.log'"]


def test_train_with_copy_and_install_does_the_install_steps_first(tmp_path):
    result = _run(*POD, "train", "--workdir=gs://bucket/run", "--copy", "--install", "--dry_run",
                  env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    install = _run(*POD, "install", "--dry_run", env={"TMPDIR": str(tmp_path)})
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == install.stdout.strip().splitlines()
    assert lines[2] == _dry("train", "--workdir=gs://bucket/run")[0]
    assert len(lines) == 3


def test_export_converts_on_worker_0_cpu_and_uploads():
    assert _dry("export", "--workdir=gs://bucket/run", "--export_dir=gs://bucket/hf", "--",
                "--dtype=float32") == [
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-east5-a --project=proj --worker=0 "
        "'--command=cd llada_jax && JAX_PLATFORMS=cpu .venv/bin/python launch/convert.py "
        "--mode=export --checkpoint=gs://bucket/run --out=/tmp/llada_jax_export --overwrite "
        "--dtype=float32 && gcloud storage rsync --recursive /tmp/llada_jax_export "
        "gs://bucket/hf'"]
    # A local destination is written on worker 0 directly.
    assert _dry("export", "--workdir=gs://bucket/run", "--export_dir=/data/hf") == [
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-east5-a --project=proj --worker=0 "
        "'--command=cd llada_jax && JAX_PLATFORMS=cpu .venv/bin/python launch/convert.py "
        "--mode=export --checkpoint=gs://bucket/run --out=/data/hf --overwrite'"]


def test_delete():
    assert _dry("delete") == ["gcloud compute tpus tpu-vm delete pod-1 --zone=us-east5-a "
                              "--project=proj --quiet"]


def test_bad_invocations_fail_with_one_line():
    cases = [
        (["--zone=z", "--workdir=gs://b", "--dry_run"], "error: --tpu is required"),
        (["--tpu=t", "--zone=z", "create", "--dry_run"], "error: --accelerator_type is required"),
        (["--tpu=t", "--zone=z", "export", "--workdir=gs://b", "--dry_run"],
         "error: --export_dir is required"),
        (["--tpu=t", "--zone=z", "create", "--accelerator_type=v9-8", "--dry_run"],
         "error: --accelerator_type=v9-8: no default runtime for TPU generation 'v9'"),
        (["--tpu=t", "--zone=z", "launch", "--dry_run"], "error: unknown action 'launch'"),
        (["--tpu=t", "--zone=z", "--env=NOEQUALS", "--workdir=gs://b", "--dry_run"],
         "error: --env expects KEY=VALUE, found 'NOEQUALS'"),
        (["--tpu=t", "--zone=z", "--workdir=gs://b", "--", "--dry_run"],
         "error: --dry_run must come before `--`"),
    ]
    for args, message in cases:
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (args, result.stderr)
        assert result.stdout == ""


def _fake_gcloud(tmp_path, exit_code):
    """A `gcloud` that appends its argv (one line, NUL-separated) to a file and exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud_calls"
    script = bin_dir / "gcloud"
    script.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" >> {log}\necho >> {log}\n"
                      f"exit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    return env, log


def test_install_for_real_stages_a_clean_copy_and_calls_gcloud_as_printed(tmp_path):
    env, log = _fake_gcloud(tmp_path, exit_code=0)
    printed = _run(*POD, "install", "--dry_run", env=env).stdout.strip().splitlines()
    result = _run(*POD, "install", env=env)
    assert result.returncode == 0, result.stderr
    calls = [line.split("\0")[:-1] for line in log.read_text().splitlines()]
    assert [" ".join(["gcloud", *call]) for call in calls] == [
        " ".join(shlex.split(line)) for line in printed]
    upload = tmp_path / "llada_jax_pod_upload" / "llada_jax"
    for needed in ("setup.py", "llada_jax/__init__.py", "llada_jax/train/trainer.py",
                   "launch/train.py", "launch/convert.py", "configs/tiny.py"):
        assert (upload / needed).is_file(), needed
    names = {p.name for p in upload.rglob("*")}
    assert not names & {".venv", ".git", "__pycache__", "tests", "notebooks"}
    assert not any(name.endswith((".pyc", ".egg-info")) for name in names)


def test_a_failing_gcloud_stops_the_sequence(tmp_path):
    env, log = _fake_gcloud(tmp_path, exit_code=3)
    result = _run(*POD, "install", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: gcloud exited with status 3"
    assert len(log.read_text().splitlines()) == 1  # the pip step never ran


def test_without_gcloud_on_the_path_nothing_runs(tmp_path):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    result = _run(*POD, "install", env={"PATH": str(empty), "TMPDIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: gcloud not found on PATH: install the Google Cloud CLI "
        "(https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the commands"]
    assert not (tmp_path / "llada_jax_pod_upload").exists()   # nothing was staged either
