"""Data sources: tfds ArrayRecord without TensorFlow, indexed local files, mixtures, specs."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llada_jax.data import sources
from llada_jax.data.sources import SourceSpec, parse_source_spec


class LladaTestDocs(tfds.core.GeneratorBasedBuilder):
    """A tiny text dataset prepared in a temporary directory (registered as llada_test_docs)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for a checksums file next to the builder's code through `importlib_resources`,
    # which it does not declare as a dependency; this builder downloads nothing, so no code path.
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "number": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"document {i} " + "z" * i, "number": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    LladaTestDocs(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


def test_tfds_source_needs_no_tensorflow(tfds_dir):
    # A fresh process reads the prepared split and never imports TensorFlow (whether or not it
    # is installed; the project does not install it).
    program = ("import sys\n"
               "from llada_jax.data import sources\n"
               f"s = sources.TfdsSource('llada_test_docs', 'test', {tfds_dir!r})\n"
               "print(sorted(s[i]['number'] for i in range(len(s))))\n"
               "assert 'tensorflow' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[0, 1, 2]"


def test_tfds_source_reads_every_record(tfds_dir):
    source = sources.TfdsSource("llada_test_docs", "train", tfds_dir)
    assert len(source) == 12
    records = [source[i] for i in range(12)]
    # tfds stores the examples in its own (hashed) order; the set must be exactly what was written.
    assert sorted(r["number"] for r in records) == list(range(12))
    for i, r in enumerate(records):
        assert r["text"] == f"document {r['number']} " + "z" * r["number"]  # bytes -> str
        assert r["_origin"] == f"tfds:llada_test_docs@train[{i}]"
    assert len(sources.TfdsSource("llada_test_docs", "train[:50%]", tfds_dir)) == 6
    with pytest.raises(FileNotFoundError, match="tfds:no_such_dataset_xyz@train"):
        sources.TfdsSource("no_such_dataset_xyz", "train", tfds_dir)


def test_file_lines_index(tmp_path):
    text = tmp_path / "a.txt"
    # Blank and whitespace-only lines are skipped; CRLF endings stripped; no final newline.
    text.write_bytes(b"first line\n\n   \t\nsecond \xc3\xbcber\r\n\n\nthird")
    records = tmp_path / "b.jsonl"
    records.write_text('{"text": "json one"}\n'
                       '{"text": "broken\n'
                       '[1, 2]\n'
                       '\n'
                       '{"text": "json four", "extra": 3}\n')
    source = sources.FileLinesSource(str(tmp_path / "*"))
    assert len(source) == 7
    got = [source[i] for i in range(len(source))]
    a, b = str(text), str(records)
    assert got[0] == {"text": "first line", "_origin": f"{a}:1"}
    assert got[1] == {"text": "second über", "_origin": f"{a}:4"}
    assert got[2] == {"text": "third", "_origin": f"{a}:7"}
    assert got[3] == {"text": "json one", "_origin": f"{b}:1"}
    assert got[4]["_origin"] == f"{b}:2" and "malformed JSON" in got[4]["_error"]
    assert got[5]["_origin"] == f"{b}:3" and "expected a JSON object" in got[5]["_error"]
    assert got[6] == {"text": "json four", "extra": 3, "_origin": f"{b}:5"}
    clone = pickle.loads(pickle.dumps(source))  # worker processes get a copy
    assert clone[6] == got[6] and clone[0] == got[0]


def test_file_index_across_chunks(tmp_path, monkeypatch):
    # A tiny chunk size makes lines straddle chunk boundaries.
    monkeypatch.setattr(sources, "_INDEX_CHUNK_BYTES", 7)
    lines = [f"line {i} " + "w" * (i % 11) if i % 4 else "" for i in range(60)]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines) + "\n")
    source = sources.FileLinesSource(str(path))
    expected = [(line, i + 1) for i, line in enumerate(lines) if line]
    assert [(source[i]["text"], int(source[i]["_origin"].rsplit(":", 1)[1]))
            for i in range(len(source))] == expected


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        sources.FileLinesSource(str(tmp_path / "nothing*.jsonl"))
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match="no non-blank line"):
        sources.FileLinesSource(str(tmp_path / "blank.txt"))


def test_parse_source_spec():
    assert parse_source_spec("tfds:c4/en:3.1.0@train[:90%]") == [
        SourceSpec("tfds", "c4/en:3.1.0", "train[:90%]")]
    assert parse_source_spec("tfds:wiki") == [SourceSpec("tfds", "wiki", "train")]
    assert parse_source_spec("files:/d/**/*.jsonl") == [SourceSpec("files", "/d/**/*.jsonl", "")]
    assert parse_source_spec("synthetic_chat@test") == [SourceSpec("synthetic_chat", "", "test")]
    assert parse_source_spec("mix:tfds:c4@train=0.7, files:/x/*.txt=0.3") == [
        SourceSpec("tfds", "c4", "train", 0.7), SourceSpec("files", "/x/*.txt", "", 0.3)]
    for bad, message in [("tfds:", "expected 'tfds"), ("mix:files:/a", "SPEC=WEIGHT"),
                         ("mix:files:/a=-1", "must be positive"), ("mix:files:/a=x", "a number"),
                         ("mix:mix:files:/a=1=1", "nested"), ("synthetic_chat@dev", "splits"),
                         ("parquet:/x", "expected 'tfds")]:
        with pytest.raises(ValueError, match=message):
            parse_source_spec(bad)


def _write_numbers(path, start, count):
    with open(path, "w") as f:
        for i in range(start, start + count):
            f.write(json.dumps({"text": str(i)}) + "\n")


def test_record_dataset_sharding_shuffling_epochs(tmp_path):
    _write_numbers(tmp_path / "n.jsonl", 0, 10)
    spec = parse_source_spec(f"files:{tmp_path / 'n.jsonl'}")
    plain = sources.record_dataset(spec, shuffle=False, num_epochs=1)
    assert [r["text"] for r in plain] == [str(i) for i in range(10)]
    hosts = [[r["text"] for r in sources.record_dataset(spec, shuffle=False, num_epochs=1,
                                                        process_index=i, process_count=3)]
             for i in range(3)]
    assert hosts == [["0", "3", "6", "9"], ["1", "4", "7"], ["2", "5", "8"]]
    shuffled_hosts = [[r["text"] for r in sources.record_dataset(
        spec, shuffle=True, seed=1, num_epochs=1, process_index=i, process_count=2)]
        for i in range(2)]
    assert len(shuffled_hosts[0]) == len(shuffled_hosts[1]) == 5
    assert sorted(shuffled_hosts[0] + shuffled_hosts[1], key=int) == [str(i) for i in range(10)]
    two_epochs = [r["text"] for r in sources.record_dataset(spec, shuffle=True, seed=1,
                                                            num_epochs=2)]
    first, second = two_epochs[:10], two_epochs[10:]
    assert sorted(first, key=int) == sorted(second, key=int) == [str(i) for i in range(10)]
    assert first != second  # a fresh permutation each epoch
    with pytest.raises(ValueError, match="process_index=2"):
        sources.record_dataset(spec, process_index=2, process_count=2)


def test_mixture_follows_weights_and_repeats_components(tmp_path):
    _write_numbers(tmp_path / "big.jsonl", 0, 1000)
    _write_numbers(tmp_path / "small.jsonl", 5000, 7)
    spec = parse_source_spec(f"mix:files:{tmp_path / 'big.jsonl'}=3,"
                             f"files:{tmp_path / 'small.jsonl'}=1")
    records = sources.record_dataset(spec, seed=0)
    first = [int(records[i]["text"]) for i in range(400)]
    from_small = [x for x in first if x >= 5000]
    assert abs(len(from_small) - 100) <= 4          # weights 3:1
    assert set(from_small) == set(range(5000, 5007))  # the small source is revisited, not ended
    from_big = [x for x in first if x < 5000]
    assert len(set(from_big)) == len(from_big)       # the big one is not repeated within its epoch
