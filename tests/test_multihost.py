"""Two JAX processes on one machine: a shared 8-device mesh, host-sharded data, save and resume.

Each process is started with 4 fake CPU devices and joins the other through
`jax.distributed.initialize(coordinator_address='localhost:PORT', num_processes=2,
process_id=i)`, then trains the tiny SFT model on conversations read from one JSONL file, each
process reading its own half of the records (`llada_jax.data.pipeline`). A run interrupted
after 2 steps and resumed from its checkpoint must give exactly the losses of an uninterrupted
run: same parameters, same optimizer state, same per-host data position, same noise.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

from tests.test_program_runner import one_device_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, os, sys
    process_id, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    import numpy as np
    from llada_jax.config import default_config
    from llada_jax.data.tokenizer import CharTokenizer
    from llada_jax.data import pipeline
    from llada_jax.train import trainer

    c = default_config()
    c.train.objective = "sft"
    c.data.source = "files:" + data
    c.train.seq_len = 48
    c.train.batch_size = 8
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    tokenizer = CharTokenizer()

    # This host's first batches, as the trainer will see them.
    iterator = iter(pipeline.build_dataset(c, tokenizer))
    questions = []
    for _ in range(2):
        batch = next(iterator)
        for tokens in batch["tokens"]:
            text = tokenizer.decode(tokens, skip_special=False)
            questions.append(text.split("<|end_header_id|>\\n\\n")[1].split("<|eot_id|>")[0])

    straight = trainer.train(c, os.path.join(out, "straight"))
    first = trainer.train(c, os.path.join(out, "resumed"), stop_after=2)
    second = trainer.train(c, os.path.join(out, "resumed"))
    report = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "rows": int(batch["tokens"].shape[0]), "questions": questions,
        "straight": [h["loss"] for h in straight.history],
        "resumed": [h["loss"] for h in first.history + second.history],
        "resumed_steps": [h["step"] for h in first.history + second.history],
    }
    with open(os.path.join(out, f"report_{process_id}.json"), "w") as f:
        json.dump(report, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_save_and_resume(tmp_path):
    data = tmp_path / "conversations.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i % 7}"}]}) + "\n")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"{one_device_xla_flags()} --xla_force_host_platform_device_count=4")
    workers = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(data),
                                 str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=420))
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-4000:]
    reports = [json.loads((tmp_path / f"report_{i}.json").read_text()) for i in range(2)]

    for i, report in enumerate(reports):
        assert report["process_index"] == i and report["process_count"] == 2
        assert report["devices"] == 8 and report["local_devices"] == 4
        assert report["rows"] == 4  # half of the global batch of 8
    # Host-sharded data: the hosts read disjoint conversations, all from the file.
    questions = [set(r["questions"]) for r in reports]
    assert len(reports[0]["questions"]) == len(questions[0]) == 8
    assert not questions[0] & questions[1]
    assert questions[0] | questions[1] <= {f"question {i}" for i in range(64)}
    # One global computation: both processes log the same losses.
    assert reports[0]["straight"] == reports[1]["straight"]
    assert len(reports[0]["straight"]) == 4
    # Interrupted after 2 steps and resumed: exactly the uninterrupted run.
    assert reports[0]["resumed_steps"] == [0, 1, 2, 3]
    for report in reports:
        assert report["resumed"] == report["straight"]
