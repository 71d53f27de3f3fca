"""Runs launch/train.py on every worker of a Cloud TPU VM pod slice, through gcloud.

    python launch/tpu_pod.py --tpu=my-v5p-64 --zone=us-east5-a \\
        --config=configs/llada_8b.py:/data/llada --workdir=gs://bucket/llada_8b \\
        [--copy] [--install] [--dry_run] -- --config.data.source=tfds:NAME

Every host of a pod slice runs the *same* command (JAX finds its peers from the TPU metadata and
`launch/train.py` calls `jax.distributed.initialize()`); this program only issues, in order:
  1. with `--copy`:    `gcloud compute tpus tpu-vm scp --recurse REPO NAME:REPO_DIR --worker=all`
                       (to a fresh REPO_DIR)
  2. with `--install`: `pip install -e REPO_DIR jax[tpu]==<local jax version>` on every worker
  3. the training command on every worker (`gcloud compute tpus tpu-vm ssh --worker=all`).
`--dry_run` prints the exact gcloud invocations instead of running them. Arguments after `--`
are passed to launch/train.py unchanged (config overrides such as --config.train.steps=10).
The workdir must be storage every host sees (gs://...): checkpoints are written by all hosts.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from absl import app, flags

_TPU = flags.DEFINE_string("tpu", None, "name of the TPU VM (pod slice)")
_ZONE = flags.DEFINE_string("zone", None, "zone of the TPU VM, e.g. us-east5-a")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's)")
_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "config preset, relative to the "
                              "repository on the workers (an argument after ':' is allowed)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory, gs://... for a multi-host slice")
_REPO_DIR = flags.DEFINE_string("repo_dir", "llada_jax", "the repository on the workers (relative "
                                "paths are under the remote home directory)")
_PYTHON = flags.DEFINE_string("python", "python3", "Python interpreter on the workers")
_ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE environment variables for the run")
_COPY = flags.DEFINE_bool("copy", False, "first copy this repository to every worker")
_INSTALL = flags.DEFINE_bool("install", False, "first pip-install the repository (and jax[tpu]) "
                             "on every worker")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the gcloud commands instead of running them")

LOCAL_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _location_flags() -> list[str]:
    location = [f"--zone={_ZONE.value}"]
    if _PROJECT.value:
        location.append(f"--project={_PROJECT.value}")
    return location


def _ssh_all(remote_command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", _TPU.value, *_location_flags(),
            "--worker=all", f"--command={remote_command}"]


def _jax_version() -> str:
    from importlib import metadata

    return metadata.version("jax")


def build_commands(train_args: list[str]) -> list[list[str]]:
    """The gcloud invocations, in order, for the flags given and the trailing train.py args."""
    repo = _REPO_DIR.value
    commands = []
    if _COPY.value:
        # scp names the copy after the destination when it does not exist yet.
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", LOCAL_REPO,
                         f"{_TPU.value}:{repo}", *_location_flags(), "--worker=all"])
    if _INSTALL.value:
        install = (f"cd {shlex.quote(repo)} && {shlex.quote(_PYTHON.value)} -m pip install -e . "
                   f"{shlex.quote(f'jax[tpu]=={_jax_version()}')}")
        commands.append(_ssh_all(install))
    environment = " ".join(shlex.quote(assignment) for assignment in _ENV.value)
    train = shlex.join([_PYTHON.value, "launch/train.py", f"--config={_CONFIG.value}",
                        f"--workdir={_WORKDIR.value}", *train_args])
    run = f"cd {shlex.quote(repo)} && " + (f"env {environment} " if environment else "") + train
    commands.append(_ssh_all(run))
    return commands


def main(argv: list[str]) -> None:
    train_args = argv[1:]
    for name, flag in (("tpu", _TPU), ("zone", _ZONE), ("workdir", _WORKDIR)):
        if not flag.value:
            print(f"error: --{name} is required", file=sys.stderr)
            sys.exit(2)
    for assignment in _ENV.value:
        if "=" not in assignment:
            print(f"error: --env expects KEY=VALUE, found {assignment!r}", file=sys.stderr)
            sys.exit(2)
    if not _WORKDIR.value.startswith("gs://"):
        print(f"warning: --workdir={_WORKDIR.value} is not on gs://; every host of a multi-host "
              f"slice must see the same checkpoint directory", file=sys.stderr)
    for command in build_commands(train_args):
        if _DRY_RUN.value:
            print(shlex.join(command))
            continue
        print(f"+ {shlex.join(command)}", file=sys.stderr)
        result = subprocess.run(command, check=False)
        if result.returncode:
            print(f"error: gcloud exited with status {result.returncode}", file=sys.stderr)
            sys.exit(result.returncode)


if __name__ == "__main__":
    app.run(main)
