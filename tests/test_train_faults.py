"""Training faults (issue 12): divergence, damaged or foreign checkpoints, finished runs, I/O.

Each test is a case a user hit: what they saw before is in its comment, what they must see now
is what it asserts. Trainer runs share one small config and the session's persistent
compilation cache (tests/conftest.py).
"""

import errno
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llada_jax import config as config_lib
from llada_jax.train import checkpoint as checkpoint_lib
from llada_jax.train import trainer
from llada_jax.train.optimizer import make_optimizer
from tests.test_program_runner import one_device_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.devices()[:1]


def _config(**train):
    c = config_lib.default_config()
    c.mesh.fsdp = 1
    # A constant schedule keeps train.steps out of the compiled step, so runs of different
    # lengths share one compilation (the session's persistent cache, tests/conftest.py).
    c.train.update(steps=4, batch_size=8, seq_len=32, warmup_steps=2, log_every=1,
                   checkpoint_every=2, keep_checkpoints=3, schedule="constant")
    c.train.update(**train)
    return c


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A healthy 4-step run with checkpoints at steps 2 and 4; tests work on copies of it."""
    workdir = tmp_path_factory.mktemp("good") / "run"
    result = trainer.train(_config(), str(workdir), devices=ONE_DEVICE)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir, result


def _copy(good_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(good_run[0], target)
    return target


def _steps(workdir):
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def test_divergence_stops_saves_nothing_bad_and_keeps_the_best_checkpoint(good_run, tmp_path):
    # Before: resuming with lr 1e6 saved all-NaN checkpoints every step, rotation
    # (keep_checkpoints=3) deleted every good one, and the run ended "done ... loss nan", exit 0.
    workdir = _copy(good_run, tmp_path)
    history = good_run[1].history
    # The checkpoint metric is the mean training loss since the previous save.
    good_means = {2: np.mean([h["loss"] for h in history[:2]]),
                  4: np.mean([h["loss"] for h in history[2:]])}
    best_good = min(good_means, key=good_means.get)
    # Detected on the loss / gradient norm, or on the state checked before each save.
    with pytest.raises(trainer.TrainingDiverged,
                       match=r"^training diverged: (loss \S+, grad norm \S+ at step \d+; nothing "
                             r"of it was saved|the state after step \d+ holds non-finite values)"
                             r".*; newest checkpoint .*lower train.learning_rate") as caught:
        trainer.train(_config(steps=20, learning_rate=1e6, checkpoint_every=1),
                      str(workdir), devices=ONE_DEVICE)
    bad_step = int(re.search(r"step (\d+)", str(caught.value)).group(1))
    assert 4 < bad_step <= 20
    steps = _steps(workdir)
    assert best_good in steps, steps             # the best good checkpoint survived rotation
    assert all(s < bad_step for s in steps)      # nothing from the diverged step on was saved
    for step in steps:                           # and every checkpoint left holds finite params
        _, params = checkpoint_lib.load_params(str(workdir), step=step)
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def test_max_bad_steps_skips_non_finite_updates_then_gives_up():
    # The optional skip-and-continue mode: with max_bad_steps=2 a NaN gradient leaves params
    # and Adam's moments exactly as they were, twice in a row; the third is applied.
    config = _config(max_bad_steps=2, learning_rate=0.1, warmup_steps=0)
    tx = make_optimizer(config.train)
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    finite = {"w": jnp.array([0.5, 0.25])}
    nan = {"w": jnp.array([jnp.nan, 1.0])}
    update, state = tx.update(finite, state, params)
    params = optax.apply_updates(params, update)
    before = jax.tree.leaves(state.inner_state)
    for _ in range(2):
        update, state = tx.update(nan, state, params)
        np.testing.assert_array_equal(update["w"], [0.0, 0.0])
        for a, b in zip(before, jax.tree.leaves(state.inner_state), strict=True):
            np.testing.assert_array_equal(a, b)
    update, state = tx.update(nan, state, params)
    assert np.isnan(np.asarray(update["w"])).any()
    # Without the option the optimizer state keeps its plain layout (old checkpoints resume).
    plain = make_optimizer(_config().train).init(params)
    assert not isinstance(plain, optax.ApplyIfFiniteState)


def test_max_bad_steps_in_the_trainer_warns_then_stops(tmp_path, caplog):
    # The documented option end to end: each skipped update is a warning; the (N+1)-th bad
    # update in a row stops the run, and nothing of it is saved.
    config = _config(steps=20, learning_rate=1e6, max_bad_steps=2, checkpoint_every=0)
    with caplog.at_level(logging.WARNING), pytest.raises(
            trainer.TrainingDiverged, match=r"^training diverged: loss \S+, grad norm \S+ at "
                                            r"step \d+ after 2 skipped updates in a row"):
        trainer.train(config, str(tmp_path), devices=ONE_DEVICE)
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    counts = [re.search(r"\((\d+) in a row", m).group(1) for m in skipped]
    assert counts[-2:] == ["1", "2"], skipped
    assert not (tmp_path / "checkpoints").exists() or _steps(tmp_path) == []


def _damage(step_dir):
    """Overwrites every file of the step's train state with zeros (sizes kept)."""
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.write(b"\0" * os.path.getsize(path))


def test_resume_falls_back_to_the_newest_intact_checkpoint(good_run, tmp_path, caplog):
    # Before: a damaged newest checkpoint ended the resume in a 90-147 line tensorstore
    # traceback. Now: a warning naming both steps, and the run continues from step 2 on exactly
    # the batches and noise of an uninterrupted run.
    workdir = _copy(good_run, tmp_path)
    _damage(workdir / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING):
        resumed = trainer.train(_config(steps=6), str(workdir), devices=ONE_DEVICE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CHECKPOINT DAMAGED: step 4 could not be restored" in w and
               "resuming from step 2 instead" in w for w in warnings), warnings
    assert (workdir / "checkpoints" / "damaged-4" / "state").is_dir()  # kept for a post-mortem
    assert [h["step"] for h in resumed.history] == [2, 3, 4, 5]
    straight = trainer.train(_config(steps=6), str(tmp_path / "straight"), devices=ONE_DEVICE)
    np.testing.assert_allclose([h["loss"] for h in resumed.history],
                               [h["loss"] for h in straight.history[2:]], rtol=1e-6)

    # Nothing intact at all: one line listing every step's error; nothing is moved.
    _damage(workdir / "checkpoints" / "6")
    _damage(workdir / "checkpoints" / "4")
    _damage(workdir / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"^no intact checkpoint in .*checkpoints to resume from: "
                                         r"step 6: .*; step 4: .*; step 2: .*start afresh\)$"):
        trainer.train(_config(steps=8), str(workdir), devices=ONE_DEVICE)
    assert _steps(workdir) == [2, 4, 6]


@pytest.mark.parametrize("field,value,message", [
    # Before: a 319-line orbax traceback.
    ("model.d_model", 32, r"model.d_model 64 -> 32; resume with the checkpoint's model"),
    # Before: KeyError: 'next_index'.
    ("train.objective", "sft", r"data.source 'synthetic' -> 'synthetic_chat', train.objective "
                               r"'pretrain' -> 'sft'; .* --config.train.init_from="),
    ("train.seq_len", 16, r"train.seq_len 32 -> 16;"),
])
def test_resume_with_another_config_names_the_fields(good_run, tmp_path, field, value, message):
    config = _config(steps=6)
    section, name = field.split(".")
    config[section][name] = value
    if field == "train.objective":
        config.data.source = "synthetic_chat"
    with pytest.raises(ValueError, match=r"^workdir \S+ was trained with another config "
                                         r"\(checkpoint \S+/checkpoints/4; checkpoint -> now\): "
                                         + message):
        trainer.train(config, str(good_run[0]), devices=ONE_DEVICE)
    assert _steps(good_run[0]) == [2, 4]  # untouched


def test_optimiser_changes_warn_unless_they_change_the_state_layout(good_run, caplog):
    abstract_params = jax.eval_shape(lambda: good_run[1].state.params)
    checkpointer = checkpoint_lib.Checkpointer(str(good_run[0] / "checkpoints"))
    saved = checkpointer.saved_config(4)
    checkpointer.close()
    changed = _config(learning_rate=1e-4, grad_clip=0.5)
    with caplog.at_level(logging.WARNING):
        trainer.check_resume_config(saved, changed, abstract_params, "ckpt/4")
    assert any("train.grad_clip 1.0 -> 0.5, train.learning_rate 0.003 -> 0.0001" in
               r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match=r"train.max_bad_steps 0 -> 3 \(checkpoint -> now\) "
                                         r"changes the optimizer state's layout"):
        trainer.check_resume_config(saved, _config(max_bad_steps=3), abstract_params, "ckpt/4")
    # Run-control fields (length, logging, mesh) change silently.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer.check_resume_config(saved, _config(steps=50, log_every=7), abstract_params,
                                    "ckpt/4")
    assert not caplog.records


def test_finished_run_says_it_is_complete(good_run, capsys):
    # Before: a re-launched finished run printed nothing useful.
    result = trainer.train(_config(), str(good_run[0]), devices=ONE_DEVICE)
    assert result.history == [] and int(result.state.step) == 4
    assert (f"training already complete: step 4 of 4, checkpoint {good_run[0]}/checkpoints/4"
            in capsys.readouterr().err)


def test_rotation_keeps_the_lowest_loss_checkpoint(tmp_path):
    # keep=2 keeps the newest two and, by the policy, the lowest-loss one however old it is.
    config = _config()
    state = {"w": np.zeros(3, np.float32)}
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0)]:
        checkpointer.save(step, state, config, loss=loss)
    assert checkpointer.all_steps() == [2, 4, 5]
    assert checkpointer.best_step() == 2
    checkpointer.close()
    reopened = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
    reopened.save(6, state, config, loss=0.5)  # the metrics of earlier steps are read back
    assert reopened.all_steps() == [5, 6]
    reopened.close()


def test_load_params_refuses_non_finite_params(tmp_path):
    # Before: `generate` on a NaN checkpoint exited 0 with an empty completion.
    config = _config()
    params = {"wte": {"embedding": np.full((2, 2), np.nan, np.float32)}}
    checkpoint_lib.save_params(str(tmp_path / "nan"), config, params)
    with pytest.raises(ValueError, match=r"holds non-finite params \(1 tensors, e.g. "
                                         r"\['wte'\]\['embedding'\]\): it was written by a "
                                         r"diverged run"):
        checkpoint_lib._check_finite_params(params, str(tmp_path / "nan"))


# A file-size limit makes every write past it fail with EFBIG, as a full disk fails with ENOSPC,
# without needing a small file system (or root) in CI. Set in a tiny launcher that then execs
# the program: the limit and the ignored SIGXFSZ survive exec (no preexec_fn in a threaded test).
_WITH_FILE_SIZE_LIMIT = ("import os, resource, signal, sys; "
                         "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                         "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024)); "
                         "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def _train_program(*args, limit_file_size=False, timeout=300):
    env = dict(os.environ, XLA_FLAGS=one_device_xla_flags(), JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    launcher = ["-c", _WITH_FILE_SIZE_LIMIT] if limit_file_size else []
    return subprocess.run([sys.executable, *launcher, os.path.join(REPO, "launch", "train.py"),
                           *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _program_args(workdir, **train):
    args = ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.mesh.fsdp=1"]
    for key, value in {**_config().train.to_dict(), **train}.items():
        if key in ("steps", "batch_size", "seq_len", "warmup_steps", "log_every",
                   "checkpoint_every", "keep_checkpoints", "schedule"):
            args.append(f"--config.train.{key}={value}")
    return [*args, "--config.data.eval_source=", "--config.train.eval_every=0"]


def test_io_errors_are_one_line_and_leave_committed_checkpoints(good_run, tmp_path):
    # Before: 899 lines of tracebacks on a full disk, and a hang on an unwritable directory.
    workdir = _copy(good_run, tmp_path)
    result = _train_program(*_program_args(workdir, steps=6, checkpoint_every=1),
                            limit_file_size=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert lines[-1].startswith(f"error: could not write checkpoint step 5 in {workdir}/"
                                f"checkpoints (the committed steps [2, 4] are intact): File too "
                                f"large (EFBIG)"), result.stderr[-3000:]
    # No orbax / tensorstore error reports from the failed save's background threads.
    assert "orbax" not in result.stderr and "OCDBT" not in result.stderr, result.stderr[-3000:]
    assert _steps(workdir) == [2, 4]
    _, params = checkpoint_lib.load_params(str(workdir))  # the newest committed one, intact
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))

    # A workdir that cannot be created: one line, before anything is compiled.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _train_program(*_program_args(blocker / "run"), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot create checkpoint directory {blocker}/run/checkpoints: Not a directory "
        f"(ENOTDIR)"), result.stderr[-3000:]


@pytest.mark.parametrize("text, expected", [
    # tensorstore's usual form: the OS message and its code.
    ("OUT_OF_RANGE: Error writing \"arr0/0\" in OCDBT database at local file \"/c/\": Failed "
     "writing: \"/c/d/1.__lock\": Failed to write 44090 bytes to file 4: File too large "
     "[os_error_code='27']", "File too large (EFBIG)"),
    # The write reported for a batch can be another one than the write that met the error, and
    # its text may carry the OS message without the code (seen in CI: a ".zarray" write).
    ("OUT_OF_RANGE: Error opening \"zarr\" driver: Error writing \"a/.zarray\" in OCDBT "
     "database at local file \"/c/\": Failed writing: No space left on device",
     "No space left on device (ENOSPC)"),
    ("CANCELLED: the batch was cancelled", "ValueError: CANCELLED: the batch was cancelled"),
])
def test_write_errors_are_named_by_the_operating_system_error(text, expected):
    error = checkpoint_lib._write_error("could not write checkpoint step 5", ValueError(text))
    assert str(error) == f"could not write checkpoint step 5: {expected}"
    assert error.errno == {"File too large (EFBIG)": errno.EFBIG,
                           "No space left on device (ENOSPC)": errno.ENOSPC}.get(expected)
