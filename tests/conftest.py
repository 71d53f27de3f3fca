"""Test setup, done before jax is imported: 8 fake CPU devices, so meshes can be tested on CPU,
compilation with few optimisations and XLA:CPU's quicker-compiling loop emitters (the suite's
programs are tiny; compiling them is most of the suite's time), and one persistent XLA
compilation cache shared by the whole session. Slow test files are handed out first.

The cache is a directory named by environment variables, so every process of the session uses
it: pytest-xdist workers, and the launch programs, notebooks and scripts the tests start as
subprocesses (they copy `os.environ`). Identical programs (the same tiny model's train step,
sampler or forward in many tests and programs) then compile once. It only skips compilations:
a cache hit is the executable that compiling the same program would give. The directory is a
fresh temporary one, removed at the end of the session, unless
LLADA_JAX_TEST_COMPILATION_CACHE names one to keep between sessions.

Expensive artifacts that several test files need (a trained tiny LLaDA-V run) are built once per
session by `shared_artifact`, in a directory shared the same way; a file lock makes the other
xdist workers wait for the first build instead of repeating it.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import pytest

# XLA:CPU's older loop emitters instead of its MLIR fusion emitters: the suite's programs compile
# in about half the time and run a little slower (`python benchmarks/compile_time.py`: the tiny
# SFT train step's first call 4.1 -> 2.1 s, a later call 0.24 -> 0.27 s; tests/test_sampler.py
# 63 -> 42 s; benchmarks/RESULTS.md). Programs started with one device keep it
# (`one_device_xla_flags`); the runs compared with values measured under XLA's defaults (the
# restructure record, the trained tiny SFT and LLaDA-V runs) set XLA_FLAGS themselves and do not
# get it.
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {COMPILE_FLAGS}"
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile with few optimisations (JAX's own switch for this, `jax_disable_most_optimizations`:
# LLVM at -O0, no expensive passes). The suite's programs are tiny, so optimising them costs far
# more than it saves when they run: tests/test_loss_chunked.py took 147 CPU seconds with XLA's
# default optimisation and 76 without. Every process of the session inherits it. The runs whose
# results are compared with values measured under the default flags set it back to "0" (the
# restructure record, the trained tiny SFT and LLaDA-V runs and their accuracy bars).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

_CACHE_VARIABLE = "LLADA_JAX_TEST_COMPILATION_CACHE"
_SHARED_VARIABLE = "LLADA_JAX_TEST_SHARED_ARTIFACTS"
# Set by the first process of the session (the xdist controller, or plain pytest); the workers
# and subprocesses inherit them and share the directories.
_CREATED_CACHE = _CACHE_VARIABLE not in os.environ
if _CREATED_CACHE:
    os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="llada_jax_compilation_cache_")
_CREATED_SHARED = _SHARED_VARIABLE not in os.environ
if _CREATED_SHARED:
    os.environ[_SHARED_VARIABLE] = tempfile.mkdtemp(prefix="llada_jax_test_artifacts_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_VARIABLE]
# Cache every compilation, however quick or small: the suite's programs are all small.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# No size limit: with one, JAX's eviction bookkeeping (`*-atime` files) raced between the
# session's processes and printed "Error writing persistent compilation cache entry" warnings on
# the programs' stderr (measured in a full -n 2 run). Without it a reader that meets an entry
# still being written fails to deserialise it, warns, and compiles instead.


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The longest test files, longest first (CPU time of a full -n 2 run on the 2-core box). With
# --dist=loadfile and --no-loadscope-reorder (pytest.ini) xdist hands whole files to its workers
# in collection order, so these start first and the short files fill the end of the workers.
# (xdist's default order, most tests first, started the single three-minute SFT test of
# test_chat_sft.py late and left the other worker idle while it ran.) Other files follow in
# their usual order.
SLOW_FILES_FIRST = (
    "test_chat_sft.py", "test_sampler.py", "test_model.py", "test_llada_v.py",
    "test_fast_sampling.py", "test_convert_faults.py", "test_readme.py",
    "test_generate_programs.py", "test_notebooks.py", "test_loss_chunked.py",
    "test_train_faults.py", "test_multimodal.py", "test_moe_training.py", "test_lm_eval.py",
    "test_launch_train.py", "test_noise_losses.py", "test_vision.py",
    "test_restructure_invariance.py", "test_lm_eval_launch.py", "test_multihost.py",
    "test_llada_v_launch.py",
)


def pytest_collection_modifyitems(items):
    """Slow files first (see SLOW_FILES_FIRST); the order inside a file is kept."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


def pytest_unconfigure(config):
    """The session's own temporary directories go when the session does (the controller's
    exit; workers leave them to it)."""
    if hasattr(config, "workerinput"):
        return
    for created, variable in ((_CREATED_CACHE, _CACHE_VARIABLE),
                              (_CREATED_SHARED, _SHARED_VARIABLE)):
        if created:
            shutil.rmtree(os.environ[variable], ignore_errors=True)


def shared_artifact(name: str, build: Callable[[str], None]) -> str:
    """The path `SHARED/name`, built by `build(path)` by the first process that asks for it in
    this session; others wait on a file lock and reuse it. A failed build leaves nothing
    behind (the next caller builds again, and fails the same way)."""
    path = os.path.join(os.environ[_SHARED_VARIABLE], name)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(path + ".done"):
                shutil.rmtree(path, ignore_errors=True)
                try:
                    build(path)
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
                open(path + ".done", "w").close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _train_llada_v_tiny(workdir: str) -> None:
    """configs/llada_v_tiny.py's full run (500 steps, the whole model), through launch/train.py
    on one CPU device, as a user runs it."""
    # One device (a quick start), XLA's default optimisation (the recipe's measured trajectory).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="0")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"),
         "--config=configs/llada_v_tiny.py", f"--workdir={workdir}",
         "--config.train.log_every=100", "--config.train.checkpoint_every=0"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 500/500 | loss" in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="session")
def llada_v_tiny_run() -> str:
    """Workdir of configs/llada_v_tiny.py trained for its 500 steps (with the released labelled
    set, 300 steps still confused colours now and then); tests only read it."""
    return shared_artifact("llada_v_tiny_run", _train_llada_v_tiny)
