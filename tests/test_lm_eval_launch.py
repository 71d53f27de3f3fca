"""launch/evaluate.py benchmark mode end to end: local task YAMLs, --limit, table, JSON, cache.

The program runs as a user runs it, each run in its own process, through `run_programs`. The
first run goes alone (the test reads its cache before the second); the second run and the two
flag errors are forked from one process that imported JAX, flax and orbax once. The lm-eval
datasets stay offline: tests.test_lm_eval sets HF_*_OFFLINE in the environment they inherit."""

import json
import os

from llada_jax.train import checkpoint
from tests.test_lm_eval import TASKS, trained
from tests.test_program_runner import run_programs


def test_tasks_mode_table_json_and_resume(tmp_path):
    config, params = trained(0)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_params(ckpt, config, params)
    cache, out_json = str(tmp_path / "cache.jsonl"), str(tmp_path / "results.json")
    args = [f"--checkpoint={ckpt}", f"--tasks={os.path.join(TASKS, 'copy_letter_mc.yaml')}",
            "--limit=6", "--mc_num=2", "--mc_batch_size=2", f"--cache={cache}",
            f"--results_json={out_json}", "--model_args=pad_multiple=8"]
    (first,) = run_programs([("evaluate.py", args, "")], tmp_path / "first", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "copy_letter_mc" in first.stdout and "requests/s" in first.stderr
    with open(out_json) as f:
        results = json.load(f)["results"]["copy_letter_mc"]
    with open(cache) as f:
        lines = f.readlines()
    assert len(lines) == 6 * 4          # 6 questions x 4 choices, one line each
    # The second run and the two flag errors share one process's imports.
    second, bad, both = run_programs(
        [("evaluate.py", args, ""),
         ("evaluate.py", [f"--checkpoint={ckpt}", "--tasks=missing.yaml"], ""),
         ("evaluate.py", [f"--checkpoint={ckpt}", "--tasks=x", "--data=y.jsonl"], "")],
        tmp_path / "second", timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    with open(cache) as f:
        assert len(f.readlines()) == len(lines)   # nothing recomputed
    with open(out_json) as f:
        assert json.load(f)["results"]["copy_letter_mc"] == results
    assert bad.returncode == 1 and "error: --tasks: task file not found: missing.yaml" in \
        bad.stderr
    assert both.returncode == 1 and "give either --data" in both.stderr
