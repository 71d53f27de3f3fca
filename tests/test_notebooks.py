"""The Colab notebooks: stripped in the repository, and each one runs top to bottom on a CPU.

Every notebook executes in a fresh Jupyter kernel of this interpreter (nbclient), with
`LLADA_NOTEBOOK_TINY=1` (a few dozen training steps) and the tests' 8 fake CPU devices, so the
meshes are real. The notebooks' own cells assert what they show (the loss fell, the samples
decode to strings, the export loads back and samples the same answers, the accuracy is in
[0, 1], ...); a failing assert is a failing cell and fails the test. The helpers of
notebooks/notebook_helpers.py with logic of their own are checked directly below.
"""

import glob
import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
sys.path.insert(0, NOTEBOOK_DIR)
import notebook_helpers as nu  # noqa: E402  (lives beside the notebooks, not in the package)

NOTEBOOKS = ("quickstart", "finetune", "likelihood", "multimodal")
# A hang guard, not a speed test (timings belong in benchmarks/): on 2 idle CPU cores a notebook
# takes under a minute, but under the load of parallel test workers several times that.
SECONDS_PER_CELL = 900


def _read(name):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)


def test_the_notebooks_are_there_and_stripped():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb"))) \
        == sorted(f"{name}.ipynb" for name in NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = _read(name)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code, name
        for cell in code:
            assert cell.outputs == [], (name, cell.source[:60])
            assert cell.execution_count is None, (name, cell.source[:60])
            assert "execution" not in cell.metadata, (name, cell.source[:60])
        # Colab opens it on a TPU runtime with a Python 3 kernel.
        assert nb.metadata["accelerator"] == "TPU"
        assert nb.metadata["kernelspec"]["name"] == "python3"
        # The first code cell is the guarded install.
        assert "pip" in code[0].source and "LLADA_NOTEBOOK_TINY" in code[0].source


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory):
    """A kernelspec that starts *this* interpreter (not whatever `python` is on PATH)."""
    directory = tmp_path_factory.mktemp("kernels")
    spec = directory / "llada_jax_test"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llada_jax tests", "language": "python"}))
    return str(directory)


def _execute(name, kernel_spec_dir, workdir):
    nb = _read(name)
    manager = AsyncKernelManager(kernel_name="llada_jax_test",
                                 kernel_spec_manager=KernelSpecManager(
                                     kernel_dirs=[kernel_spec_dir]))
    client = NotebookClient(nb, km=manager, timeout=SECONDS_PER_CELL,
                            resources={"metadata": {"path": str(workdir)}})
    env = dict(os.environ, LLADA_NOTEBOOK_TINY="1", JAX_PLATFORMS="cpu", TMPDIR=str(workdir),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    env.pop("HF_CHECKPOINT", None)
    client.execute(env=env)   # raises CellExecutionError naming the cell on any error
    return nb


def _outputs(nb, output_type):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == output_type]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, kernel_spec_dir, tmp_path):
    nb = _execute(name, kernel_spec_dir, tmp_path)
    printed = "".join(o.text for o in _outputs(nb, "stream") if o.name == "stdout")
    assert "CPU: 8 x cpu" in printed and "LLADA_NOTEBOOK_TINY=1" in printed
    assert "Traceback" not in printed
    if name == "finetune":  # the loss curve was drawn inline
        assert any("image/png" in o.data for o in _outputs(nb, "display_data"))
    # The repository file itself was not touched by the run, and stripping the executed copy
    # gives back its cells exactly.
    committed = _read(name)
    assert all(cell.outputs == [] for cell in committed.cells if cell.cell_type == "code")
    executed = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, str(executed))
    nu.strip_outputs(str(executed))
    assert nbformat.read(str(executed), as_version=4).cells == committed.cells


# ----------------------------------------------------------------------------------------------
# notebook_helpers on its own.


def test_tiny_mode_and_config_choice(monkeypatch):
    cpu = nu.Backend("cpu", 8, "cpu", 1, tiny=False)
    full = nu.load_config("sft_tiny", cpu)
    assert full.train.steps == nu.load_preset("sft_tiny").train.steps  # the preset as written
    tiny = nu.load_config("sft_tiny", nu.Backend("tpu", 8, "TPU v4", 1, tiny=True), tiny_steps=40)
    assert (tiny.train.steps, tiny.train.log_every, tiny.train.eval_every,
            tiny.train.checkpoint_every) == (40, 10, 0, 0)
    assert tiny.train.warmup_steps <= 10
    for value, expected in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(nu.TINY_ENV, value)
        assert nu.tiny_mode() is expected
    with pytest.raises(FileNotFoundError, match="no_such_preset.py"):
        nu.load_preset("no_such_preset")


def test_chat_jsonl_and_multiple_choice_set(tmp_path):
    path = nu.write_chat_jsonl(str(tmp_path / "chat.jsonl"), 5)
    lines = [json.loads(line) for line in open(path)]
    assert len(lines) == 5
    for record in lines:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
    items = nu.synthetic_multiple_choice(20)
    for item in items:
        word = item.question.split()[-1]
        assert len(word) == 3 and word.islower()
        # The five tasks' answers to the word, by their definitions, duplicates removed.
        expected = list(dict.fromkeys([word, word.upper(), word[::-1], word[0], word[-1]]))
        assert list(item.choices) == expected
        answers = {"Repeat": word, "Uppercase": word.upper(), "Reverse": word[::-1],
                   "First": word[0], "Last": word[-1]}
        # Questions may start with an opener ("Now: ", "Task: ", ...): the task verb follows it.
        verb = next(w for w in item.question.split() if w in answers)
        right = answers[verb]
        assert item.choices[item.label] == right
    with pytest.raises(ValueError, match="num_questions"):
        nu.synthetic_multiple_choice(0)
