"""launch/evaluate.py benchmark mode end to end: local task YAMLs, --limit, table, JSON, cache."""

import json
import os
import subprocess
import sys

from llada_jax.train import checkpoint
from tests.test_lm_eval import TASKS, trained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "evaluate.py"), *args],
                          capture_output=True, text=True, env=env, timeout=900)


def test_tasks_mode_table_json_and_resume(tmp_path):
    config, params = trained(0)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_params(ckpt, config, params)
    cache, out_json = str(tmp_path / "cache.jsonl"), str(tmp_path / "results.json")
    args = [f"--checkpoint={ckpt}", f"--tasks={os.path.join(TASKS, 'copy_letter_mc.yaml')}",
            "--limit=6", "--mc_num=2", "--mc_batch_size=2", f"--cache={cache}",
            f"--results_json={out_json}", "--model_args=pad_multiple=8"]
    first = run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "copy_letter_mc" in first.stdout and "requests/s" in first.stderr
    with open(out_json) as f:
        results = json.load(f)["results"]["copy_letter_mc"]
    with open(cache) as f:
        lines = f.readlines()
    assert len(lines) == 6 * 4          # 6 questions x 4 choices, one line each
    second = run(args)
    assert second.returncode == 0, second.stderr[-3000:]
    with open(cache) as f:
        assert len(f.readlines()) == len(lines)   # nothing recomputed
    with open(out_json) as f:
        assert json.load(f)["results"]["copy_letter_mc"] == results
    bad = run([f"--checkpoint={ckpt}", "--tasks=missing.yaml"])
    assert bad.returncode == 1 and "error: --tasks: task file not found: missing.yaml" in \
        bad.stderr
    both = run([f"--checkpoint={ckpt}", "--tasks=x", "--data=y.jsonl"])
    assert both.returncode == 1 and "give either --data" in both.stderr
