"""launch/program.py, the runner of every launch program: quiet logs, --verbose, one last
`error:` line for user and I/O errors, and no hang on background threads after an error.

Each case runs a small program (written here, using program.run as the launch programs do) in
a subprocess, so exit statuses, stream contents and hangs are what a user sees. No JAX import:
each run takes well under a second. `run_programs` (used by tests/test_generate_programs.py) runs
real launch programs in forked children of one process that imported JAX once.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = textwrap.dedent("""
    import errno, logging, os, sys, threading, time
    sys.path.insert(0, {launch!r})
    import program
    from absl import flags, logging as absl_logging

    _CASE = flags.DEFINE_string("case", "ok", "what main does")
    _PATH = flags.DEFINE_string("path", "", "a path for the I/O cases")

    def writer():   # like an asynchronous checkpoint writer: not a daemon, logs late
        time.sleep(1.0)
        absl_logging.error("background writer failed")
        time.sleep(600)

    def main(argv):
        absl_logging.info("absl info line")
        logging.getLogger("orbax.checkpoint").info("orbax info line")
        logging.getLogger("jax._src.xla_bridge").info("jax info line")
        absl_logging.warning("absl warning line")
        print("some output", flush=True)
        case, path = _CASE.value, _PATH.value
        if case == "ok":
            return
        threading.Thread(target=writer, daemon=False).start()
        if case == "write_into_directory":
            open(path, "w")
        if case == "under_a_file":
            open(os.path.join(path, "child.txt"), "w")
        if case == "permission_denied":   # as open() raises it (tests may run as root)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        if case == "disk_full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if case == "read_only_file_system":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        if case == "disk_full_while_writing":   # the write has no name; the open had one
            try:
                raise FileNotFoundError(errno.ENOENT, "x", path)
            except OSError:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if case == "value_error":
            raise ValueError("config.train.steps: expected\\n  a positive integer,\\nfound 0")
        if case == "missing_file":
            raise FileNotFoundError("--data file not found: /nowhere/eval.jsonl")
        if case == "sys_exit_message":
            sys.exit("error: --image: cannot read image x.png")
        if case == "sys_exit_status":
            print("error: printed by the program", file=sys.stderr)
            sys.exit(2)
        if case == "bug":
            raise RuntimeError("a bug")

    if __name__ == "__main__":
        program.run(main)
""")


@pytest.fixture(scope="module")
def program_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("program") / "toy_program.py"
    path.write_text(PROGRAM.format(launch=os.path.join(ROOT, "launch")))
    return str(path)


def run(program_path, *args, timeout=20):
    return subprocess.run([sys.executable, program_path, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_default_logs_are_warnings_only(program_path):
    result = run(program_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "some output\n"
    assert "absl warning line" in result.stderr
    for chatter in ("absl info line", "orbax info line", "jax info line"):
        assert chatter not in result.stderr


def test_verbose_shows_info_logs(program_path):
    result = run(program_path, "--verbose")
    assert result.returncode == 0, result.stderr
    for line in ("absl info line", "orbax info line", "jax info line", "absl warning line"):
        assert line in result.stderr


def _last_line(result):
    lines = result.stderr.strip().splitlines()
    assert lines, result
    return lines[-1]


@pytest.mark.parametrize("case,expected", [
    ("permission_denied", "error: {path}: Permission denied (check the permissions"),
    ("disk_full", "error: {path}: No space left on device (the disk is full"),
    ("read_only_file_system", "error: {path}: Read-only file system (the file system is "
                              "read-only"),
    ("disk_full_while_writing", "error: {path}: No space left on device"),
    ("value_error", "error: config.train.steps: expected a positive integer, found 0"),
    ("missing_file", "error: --data file not found: /nowhere/eval.jsonl"),
    ("sys_exit_message", "error: --image: cannot read image x.png"),
])
def test_errors_are_one_last_line_and_never_hang(program_path, tmp_path, case, expected):
    # A non-daemon thread that would log after 1 s and then live for 10 minutes is running:
    # the program must still end at once, with the error line last.
    path = str(tmp_path / "target")
    result = run(program_path, f"--case={case}", f"--path={path}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "background writer failed" not in result.stderr
    assert _last_line(result).startswith(expected.format(path=path)), result.stderr
    assert result.stdout == "some output\n"


def test_real_io_errors_name_the_path(program_path, tmp_path):
    directory = tmp_path / "a_directory"
    directory.mkdir()
    result = run(program_path, "--case=write_into_directory", f"--path={directory}")
    assert result.returncode == 1
    assert _last_line(result) == (f"error: {directory}: Is a directory (a file path is "
                                  f"expected here)")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = run(program_path, "--case=under_a_file", f"--path={a_file}")
    assert result.returncode == 1
    assert _last_line(result) == (f"error: {a_file / 'child.txt'}: Not a directory (a part of "
                                  f"the path is a file, not a directory)")


def test_verbose_user_error_shows_the_traceback_then_the_line(program_path):
    result = run(program_path, "--case=value_error", "--verbose")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert _last_line(result) == "error: config.train.steps: expected a positive integer, found 0"


def test_program_exit_status_is_kept_without_hanging(program_path):
    result = run(program_path, "--case=sys_exit_status")
    assert result.returncode == 2
    assert _last_line(result) == "error: printed by the program"


def test_a_bug_keeps_its_traceback_and_does_not_hang(program_path):
    result = run(program_path, "--case=bug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and _last_line(result) == "RuntimeError: a bug"


def test_a_bad_flag_is_one_line(program_path):
    result = run(program_path, "--no_such_flag=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Unknown command line flag 'no_such_flag' (--help lists the flags)"]


# Runs launch programs as a user runs them, many in a row, sharing one process's imports: the
# parent imports the libraries (no JAX backend is started), then each program runs in a forked
# child with its own stdin, stdout, stderr and fresh flags. A program costs a fraction of a
# second instead of the few seconds of importing JAX, flax and orbax again.
FORKED_PROGRAMS = """
import json, os, runpy, sys
import flax.linen, jax, ml_collections, optax, orbax.checkpoint   # the shared imports
import llada_jax.diffusion.sampler, llada_jax.train.checkpoint, llada_jax.train.state

jobs, directory = json.loads(sys.argv[1]), sys.argv[2]
sys.path.insert(0, os.path.join(os.getcwd(), "launch"))
for number, (program, args, stdin) in enumerate(jobs):
    paths = [os.path.join(directory, f"{number}.{name}") for name in ("in", "out", "err")]
    with open(paths[0], "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(stdin)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, (path, mode) in enumerate(zip(paths, ("r", "w", "w"))):
            flags = os.O_RDONLY if mode == "r" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            os.dup2(os.open(path, flags, 0o644), fd)
        sys.stdin = open(0, closefd=False)
        sys.argv = [os.path.join("launch", program), *args]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            status = 0
        except SystemExit as e:
            status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def one_device_xla_flags():
    """This session's XLA_FLAGS (tests/conftest.py) without the fake device count: a program
    started with them sees one CPU device (a quicker start) and compiles as the tests do."""
    return " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                    if not flag.startswith("--xla_force_host_platform_device_count"))


def run_programs(jobs, directory, timeout=300, env=None):
    """Runs launch programs one after another in forked children of one process.

    jobs: (program file in launch/, [args], stdin text; "\\udcXX" stands for the byte 0xXX).
    env: variables set for the programs over os.environ (default: one CPU device, a quick
    start). Returns one CompletedProcess-like (returncode, stdout, stderr) per job.
    """
    env = dict(os.environ,
               **(env or {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": one_device_xla_flags()}))
    os.makedirs(directory, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", FORKED_PROGRAMS, json.dumps(jobs),
                             str(directory)], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = [int(line) for line in result.stdout.split()]
    assert len(statuses) == len(jobs), result.stdout
    outputs = []
    for number, status in enumerate(statuses):
        with open(os.path.join(directory, f"{number}.out")) as out, \
                open(os.path.join(directory, f"{number}.err")) as err:
            outputs.append(subprocess.CompletedProcess(jobs[number][:2], status, out.read(),
                                                       err.read()))
    return outputs
