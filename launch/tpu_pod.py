"""Drives a Cloud TPU VM pod slice with gcloud: create, install, train, resume, export, delete.

    python launch/tpu_pod.py ACTION --tpu=NAME --zone=ZONE [--project=P] [flags] [-- ARGS]

Actions (the default is `train`), each one or two gcloud invocations:

  create   `gcloud compute tpus tpu-vm create NAME --accelerator-type=TYPE --version=RUNTIME`
           (--accelerator_type; the runtime defaults to the one for that TPU generation; --spot)
  install  on every worker: this repository (a clean copy of its sources, `--copy`; or a
           `git clone` of --repo_url) and a virtual environment `REPO_DIR/.venv` of Python 3.11
           with `pip install -e .[tpu]` (the README's install plus the TPU extra)
  train    on every worker, the same `launch/train.py --config=... --workdir=... ARGS`;
           with --detach it runs under nohup, logging to ~/llada_jax_train.log (see `logs`)
  resume   the same command as `train`: the trainer resumes from WORKDIR/checkpoints, on the
           exact next batch (after a preemption, re-create and re-install first)
  logs     the last lines of ~/llada_jax_train.log on worker 0 (a --detach run)
  export   on worker 0, on its CPU: `launch/convert.py --mode=export --checkpoint=WORKDIR`
           into a Hugging Face directory, then `gcloud storage rsync` to --export_dir (gs://)
  delete   `gcloud compute tpus tpu-vm delete NAME --quiet`

`--dry_run` prints the exact gcloud invocations, one per line, instead of running them. Arguments
after `--` go to the program the action runs (train/resume: launch/train.py config overrides
such as `--config.train.steps=10`; export: launch/convert.py flags such as `--dtype=float32`).
`train --copy --install` does the `install` steps first. The workdir must be storage that every
host sees (gs://...): all hosts write their shards of every checkpoint. See docs/tpu_pod.md.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import program
from absl import flags

ACTIONS = ("create", "install", "train", "resume", "logs", "export", "delete")
# TPU generation (the accelerator type's prefix) -> the TPU VM runtime image for JAX.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# = llada_jax.parallel.DISTRIBUTED_ENV (not imported: this runs where jax may be missing).
DISTRIBUTED_ENV = "LLADA_JAX_DISTRIBUTED"
VENV_PYTHON = ".venv/bin/python"      # relative to the repository on the workers
LOG_FILE = "$HOME/llada_jax_train.log"
EXPORT_STAGING = "/tmp/llada_jax_export"
# What a worker needs of the repository (never virtual environments, caches or run outputs).
SOURCES = ("setup.py", "README.md", "llada_jax", "launch", "configs", "benchmarks")
UPLOAD_ROOT = os.path.join(tempfile.gettempdir(), "llada_jax_pod_upload")
LOCAL_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TPU = flags.DEFINE_string("tpu", None, "name of the TPU VM (pod slice)")
_ZONE = flags.DEFINE_string("zone", None, "zone of the TPU VM, e.g. us-east5-a")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's)")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None,
                                        "create: e.g. v5p-64, v5litepod-32, v4-32, v6e-64")
_RUNTIME_VERSION = flags.DEFINE_string("runtime_version", None, "create: TPU VM image (default: "
                                       "the JAX image of the accelerator's generation)")
_SPOT = flags.DEFINE_bool("spot", False, "create: a Spot TPU (cheaper, can be preempted)")
_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "config preset, relative to the "
                              "repository on the workers (an argument after ':' is allowed)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory, gs://... for a multi-host slice")
_REPO_DIR = flags.DEFINE_string("repo_dir", "llada_jax", "the repository on the workers (relative "
                                "paths are under the remote home directory)")
_REPO_URL = flags.DEFINE_string("repo_url", None, "install: git clone this URL on the workers "
                                "instead of copying the local sources")
_PYTHON = flags.DEFINE_string("python", VENV_PYTHON, "Python interpreter on the workers, "
                              "relative to the repository; the default is the virtual "
                              "environment `install` creates")
_BASE_PYTHON = flags.DEFINE_string("base_python", "python3.11", "install: the interpreter the "
                                   "virtual environment is made from (installed with apt-get; "
                                   "jax needs Python >= 3.11)")
_ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE environment variables for the run")
_COPY = flags.DEFINE_bool("copy", False, "train: first copy this repository's sources to every "
                          "worker")
_INSTALL = flags.DEFINE_bool("install", False, "train: first pip-install the repository (and "
                             "jax[tpu]) on every worker")
_DETACH = flags.DEFINE_bool("detach", False, "train/resume: run under nohup and return at once; "
                            f"output goes to {LOG_FILE} on every worker")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export: where the Hugging Face directory "
                                  "goes (gs://...: uploaded from worker 0; else a path on it)")
_LOG_LINES = flags.DEFINE_integer("log_lines", 100, "logs: how many lines to show")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the gcloud commands instead of running them")


def _location_flags() -> list[str]:
    location = [f"--zone={_ZONE.value}"]
    if _PROJECT.value:
        location.append(f"--project={_PROJECT.value}")
    return location


def _tpu_vm(verb: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb]


def _ssh(remote_command: str, worker: str = "all") -> list[str]:
    return [*_tpu_vm("ssh"), _TPU.value, *_location_flags(), f"--worker={worker}",
            f"--command={remote_command}"]


def _in_repo(command: str) -> str:
    return f"cd {shlex.quote(_REPO_DIR.value)} && {command}"


def runtime_version(accelerator_type: str) -> str:
    """The TPU VM image for JAX of an accelerator type such as 'v5p-64' (ValueError if unknown)."""
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise ValueError(f"--accelerator_type={accelerator_type}: no default runtime for TPU "
                         f"generation {generation!r} (known: {sorted(RUNTIME_VERSIONS)}); pass "
                         f"--runtime_version")
    return RUNTIME_VERSIONS[generation]


def upload_directory() -> str:
    """The local staging copy of the sources that `install` uploads (named like --repo_dir)."""
    return os.path.join(UPLOAD_ROOT, os.path.basename(os.path.normpath(_REPO_DIR.value)))


def stage_sources() -> str:
    """Copies SOURCES of this repository into a fresh `upload_directory()`; returns it."""
    target = upload_directory()
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        source = os.path.join(LOCAL_REPO, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(target, name), ignore=ignore)
        elif os.path.isfile(source):
            shutil.copy2(source, target)
    return target


def create_command() -> list[str]:
    accelerator = _ACCELERATOR_TYPE.value
    runtime = _RUNTIME_VERSION.value or runtime_version(accelerator)
    command = [*_tpu_vm("create"), _TPU.value, *_location_flags(),
               f"--accelerator-type={accelerator}", f"--version={runtime}"]
    return command + (["--spot"] if _SPOT.value else [])


def copy_command() -> list[str]:
    """scp of the staged sources into the parent of --repo_dir: scp merges into an existing
    copy, so installing again updates the code instead of nesting a second copy in it."""
    parent = os.path.dirname(os.path.normpath(_REPO_DIR.value)) or "."
    if _REPO_URL.value:
        repo = shlex.quote(_REPO_DIR.value)
        clone = (f"if [ -d {repo} ]; then git -C {repo} pull --ff-only; else git clone --depth=1 "
                 f"{shlex.quote(_REPO_URL.value)} {repo}; fi")
        return _ssh(clone)
    return [*_tpu_vm("scp"), "--recurse", upload_directory(), f"{_TPU.value}:{parent}",
            *_location_flags(), "--worker=all"]


def pip_command() -> list[str]:
    """The README's `pip install -e .` with the `tpu` extra (the TPU build of the pinned jax,
    and gcsfs for gs:// checkpoint directories), into REPO_DIR/.venv (made from --base_python)."""
    python = _PYTHON.value
    packages = shlex.join(["-e", ".[tpu]"])
    steps = []
    if python == VENV_PYTHON:
        base = _BASE_PYTHON.value
        apt = shlex.join(["sudo", "apt-get", "install", "-y", "-qq", base, f"{base}-venv"])
        steps += ["sudo apt-get update -qq", apt, f"{shlex.quote(base)} -m venv .venv"]
    python = shlex.quote(python)
    steps += [f"{python} -m pip install -q --upgrade pip", f"{python} -m pip install -q {packages}"]
    return _ssh(_in_repo(" && ".join(steps)))


def train_command(train_args: list[str]) -> list[str]:
    # Every worker is one process of the job: the marker makes launch/train.py call
    # jax.distributed.initialize(), which finds the other workers from the TPU metadata.
    assignments = [f"{DISTRIBUTED_ENV}=1", *_ENV.value]
    environment = " ".join(shlex.quote(assignment) for assignment in assignments)
    train = shlex.join([_PYTHON.value, "launch/train.py", f"--config={_CONFIG.value}",
                        f"--workdir={_WORKDIR.value}", *train_args])
    run = (f"env {environment} " if environment else "") + train
    if _DETACH.value:
        # nohup + every stream redirected: the run outlives the ssh session that started it.
        run = f"nohup {run} > {LOG_FILE} 2>&1 < /dev/null &"
    return _ssh(_in_repo(run))


def export_command(convert_args: list[str]) -> list[str]:
    """Worker 0 converts on its CPU (an 8B model is 32 GB of float32: host memory, not one TPU
    chip's), then uploads. JAX_PLATFORMS=cpu keeps it off the slice the other workers own."""
    destination = _EXPORT_DIR.value
    to_gcs = destination.startswith("gs://")
    out = EXPORT_STAGING if to_gcs else destination
    convert = shlex.join([_PYTHON.value, "launch/convert.py", "--mode=export",
                          f"--checkpoint={_WORKDIR.value}", f"--out={out}", "--overwrite",
                          *convert_args])
    command = f"JAX_PLATFORMS=cpu {convert}"
    if to_gcs:
        command += " && " + shlex.join(["gcloud", "storage", "rsync", "--recursive", out,
                                        destination])
    return _ssh(_in_repo(command), worker="0")


def build_commands(action: str, program_args: list[str]) -> list[list[str]]:
    """The gcloud invocations of `action`, in order (flags are read from absl)."""
    if action == "create":
        return [create_command()]
    if action == "delete":
        return [[*_tpu_vm("delete"), _TPU.value, *_location_flags(), "--quiet"]]
    if action == "install":
        return [copy_command(), pip_command()]
    if action == "logs":
        return [_ssh(f"tail -n {_LOG_LINES.value} {LOG_FILE}", worker="0")]
    if action == "export":
        return [export_command(program_args)]
    commands = []  # train / resume
    if _COPY.value:
        commands.append(copy_command())
    if _INSTALL.value:
        commands.append(pip_command())
    return [*commands, train_command(program_args)]


def _check_flags(action: str) -> None:
    """Exits with a one-line error for a missing or malformed flag of `action`."""
    required = ["tpu", "zone"]
    if action in ("train", "resume", "export"):
        required.append("workdir")
    if action == "create":
        required.append("accelerator_type")
    if action == "export":
        required.append("export_dir")
    for name in required:
        if not flags.FLAGS[name].value:
            _fail(f"--{name} is required")
    for assignment in _ENV.value:
        if "=" not in assignment:
            _fail(f"--env expects KEY=VALUE, found {assignment!r}")
    if action == "create" and not _RUNTIME_VERSION.value:
        try:
            runtime_version(_ACCELERATOR_TYPE.value)
        except ValueError as e:
            _fail(str(e))
    if action in ("train", "resume") and not _WORKDIR.value.startswith("gs://"):
        print(f"warning: --workdir={_WORKDIR.value} is not on gs://; every host of a multi-host "
              f"slice must see the same checkpoint directory", file=sys.stderr)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    args = argv[1:]
    action = "train"
    if args and not args[0].startswith("-"):
        action = args.pop(0)
        if action not in ACTIONS:
            _fail(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if "--dry_run" in args:
        # After `--` it would reach train.py, and the gcloud commands would really run.
        _fail("--dry_run must come before `--` (arguments after it go to the worker program)")
    _check_flags(action)
    commands = build_commands(action, args)
    if _DRY_RUN.value:
        for command in commands:
            print(shlex.join(command))
        return
    missing = sorted({command[0] for command in commands if shutil.which(command[0]) is None})
    if missing:
        _fail(f"{', '.join(missing)} not found on PATH: install the Google Cloud CLI "
              f"(https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the "
              f"commands")
    if not _REPO_URL.value and (action == "install" or _COPY.value):
        stage_sources()
    for command in commands:
        print(f"+ {shlex.join(command)}", file=sys.stderr)
        result = subprocess.run(command, check=False)
        if result.returncode:
            _fail(f"gcloud exited with status {result.returncode}")


if __name__ == "__main__":
    program.run(main)
