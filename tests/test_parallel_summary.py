"""Multi-host start-up decisions and TensorBoard files on local and cloud paths."""

import os
from typing import ClassVar

import pytest

from llada_jax import parallel
from llada_jax.train import summary
from tests.test_launch_train import _read_tfrecords


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"LLADA_JAX_DISTRIBUTED": "1"}, {}),               # a TPU-VM pod worker (tpu_pod.py)
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, {}),              # TPU on Kubernetes
    ({"TPU_WORKER_HOSTNAMES": "a"}, None),              # one host
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}),
])
def test_distributed_initialisation_only_when_several_processes(monkeypatch, env, expected):
    for name in ("LLADA_JAX_DISTRIBUTED", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
                 "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parallel.maybe_initialize_distributed()
    assert calls == ([] if expected is None else [expected])


class _CloudPath:
    """Stands in for an epath.Path on gs://: whole-object writes only, no append."""

    store: ClassVar[dict[str, bytes]] = {}

    def __init__(self, path):
        self._path = os.fspath(path)

    def __fspath__(self):
        return self._path

    def __truediv__(self, name):
        return _CloudPath(self._path + "/" + name)

    def mkdir(self, parents=False, exist_ok=False):
        pass

    def write_bytes(self, data):
        _CloudPath.store[self._path] = bytes(data)


def test_summary_on_a_cloud_path_rewrites_whole_objects(monkeypatch, tmp_path):
    local = summary.SummaryWriter(str(tmp_path))
    monkeypatch.setattr(summary.epath, "Path", _CloudPath)
    remote = summary.SummaryWriter("gs://bucket/run/tensorboard")
    for writer in (local, remote):
        writer.scalars(1, {"train/loss": 2.5})
        writer.flush()
        writer.scalars(2, {"train/loss": 1.5})
        writer.close()
    assert remote.path.startswith("gs://bucket/run/tensorboard/events.out.tfevents.")
    path = tmp_path / "remote"
    path.write_bytes(_CloudPath.store[remote.path])
    local_records, remote_records = _read_tfrecords(local.path), _read_tfrecords(str(path))
    assert len(remote_records) == 3  # version event + two scalar events
    # Same events apart from the wall times (bytes 1..8 of each record's payload).
    assert [r[9:] for r in remote_records] == [r[9:] for r in local_records]
