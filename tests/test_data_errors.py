"""Bad training data: one line naming `file:line` and the problem, before training where cheap.

Each case writes a small file with one bad line among good ones and builds the pipeline as the
trainer does. The local-file pre-scan must report the bad line when the dataset is built
(before any batch); errors found later (inside grain's worker processes) must reach the caller
as the same one-line `BadRecordError`; `data.bad_records='skip'` must say how many it skipped.
"""

import json
import logging
import re

import numpy as np
import pytest

from llada_jax.config import default_config
from llada_jax.data import bad_records, pipeline, sources
from llada_jax.data.schema import BadRecordError
from llada_jax.data.tokenizer import CharTokenizer

TOK = CharTokenizer()
GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}]}).encode()
GOOD_TEXT = json.dumps({"text": "a good document"}).encode()


def _config(path, objective="sft", **data):
    c = default_config()
    c.train.objective = objective
    c.train.seq_len = 48
    c.train.batch_size = 2
    c.data.source = f"files:{path}"
    c.data.shuffle = False
    for key, value in data.items():
        c.data[key] = value
    return c


def _write(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


# (bad line bytes, objective, expected message after "path:LINE: ")
CASES = {
    "malformed_json": (b'{"messages": [{"role": "user", "content": "hi"}', "sft",
                       r"malformed JSON \(Expecting ',' delimiter: line 1 column 48"),
    "not_utf8": (b'{"messages": "caf\xe9"}', "sft",
                 r"not valid UTF-8 \('utf-8' codec can't decode byte 0xe9 in position 17: "
                 r"invalid continuation byte\)"),
    "json_list": (b'[{"role": "user", "content": "hi"}]', "sft",
                  "expected a JSON object, found a JSON list"),
    "json_string": (b'"just a string"', "pretrain", "expected a JSON object, found a JSON string"),
    "missing_messages": (b'{"conversations": []}', "sft",
                         "expected a non-empty list in field 'messages', found no such field"),
    "missing_text": (b'{"body": "x"}', "pretrain",
                     "expected a string in field 'text' \\(config.data.text_field\\), found no "
                     "such field"),
    "array_file": (b"[", "sft", r"malformed JSON \(.*\) \(files: reads one JSON object per line; "
                   "this looks like a file holding one JSON list\\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_line_is_one_line_with_file_and_line_before_any_batch(tmp_path, case):
    bad, objective, message = CASES[case]
    good = GOOD_CHAT if objective == "sft" else GOOD_TEXT
    path = tmp_path / "data.jsonl"
    _write(path, [good, good, bad, good])
    with pytest.raises(BadRecordError, match=f"^{path}:3: {message}") as caught:
        pipeline.build_dataset(_config(path, objective), TOK, process_index=0, process_count=1)
    assert "\n" not in str(caught.value)
    assert caught.value.origin == f"{path}:3"


def test_skip_drops_bad_lines_and_logs_their_count(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    lines = [GOOD_CHAT, b"{oops", b'["a list"]', GOOD_CHAT, b'{"messages": []}',
             b'{"messages": "caf\xe9"}', GOOD_CHAT]
    _write(path, lines)
    bad_records._SKIPPED.clear()
    with caplog.at_level(logging.WARNING):
        dataset = pipeline.build_dataset(_config(path, bad_records="skip", num_epochs=1), TOK,
                                         process_index=0, process_count=1)
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"skipping 4 bad record(s) of 7 in files:{path}" in warnings[0]
    assert "invalid 1, unreadable 3" in warnings[0]
    assert f"{path}:2: malformed JSON" in warnings[0] and "and 1 more" in warnings[0]
    assert dict(bad_records._SKIPPED) == {"unreadable": 3, "invalid": 1}
    assert bad_records.skipped_summary() == ("4 bad record(s) skipped "
                                          "(config.data.bad_records='skip'): invalid 1, "
                                          "unreadable 3")
    # Only the three good conversations remain: one batch of two, the third dropped by batching.
    batches = list(dataset)
    assert len(batches) == 1
    for row in batches[0]["tokens"]:
        assert TOK.decode(row) == "user\n\nhiassistant\n\nyo"
    # Building the same dataset again (the trainer rebuilds its eval set at every evaluation)
    # does not scan nor count again.
    pipeline.build_dataset(_config(path, bad_records="skip", num_epochs=1), TOK,
                           process_index=0, process_count=1)
    assert dict(bad_records._SKIPPED) == {"unreadable": 3, "invalid": 1}


def test_skips_found_while_reading_are_logged_with_the_running_count(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    too_long = json.dumps({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "w" * 60}]}).encode()
    _write(path, [GOOD_CHAT, too_long, too_long, GOOD_CHAT])
    bad_records._SKIPPED.clear()
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.build_dataset(_config(path, bad_records="skip", num_epochs=1),
                                              TOK, process_index=0, process_count=1))
    assert len(batches) == 1
    warnings = [r.getMessage() for r in caplog.records if "skipping bad record" in r.getMessage()]
    assert len(warnings) == 2
    assert "skipping bad record 2 " in warnings[1] and "overlong 2" in warnings[1]
    # (grain's read threads may process lines 2 and 3 in either order)
    lines = [re.search(rf"{re.escape(str(path))}:(\d+): conversation too long", w).group(1)
             for w in warnings]
    assert sorted(lines) == ["2", "3"]
    assert bad_records.skipped_summary().startswith("2 bad record(s) skipped")


def test_every_record_bad_is_an_error_even_with_skip(tmp_path):
    path = tmp_path / "data.jsonl"
    _write(path, [b"{", b"[1]"])
    # Twice: a second build (the pre-scan's result is cached per process) refuses it too,
    # rather than reading from an empty source.
    for _ in range(2):
        with pytest.raises(ValueError, match=f"config.data.source: every one of the 2 records "
                                             f"of files:{path} is bad; first: {path}:1: "
                                             f"malformed"):
            pipeline.build_dataset(_config(path, bad_records="skip"), TOK, process_index=0,
                                   process_count=1)


def test_files_over_the_prescan_limit_are_checked_as_read(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    _write(path, [GOOD_CHAT, GOOD_CHAT, b"{broken", GOOD_CHAT])
    monkeypatch.setattr(bad_records, "PRESCAN_MAX_BYTES", 10)
    dataset = pipeline.build_dataset(_config(path), TOK, process_index=0, process_count=1)
    iterator = iter(dataset)
    next(iterator)  # lines 1 and 2 are fine
    with pytest.raises(BadRecordError, match=f"^{path}:3: malformed JSON"):
        next(iterator)


def test_error_raised_in_a_worker_process_reaches_the_caller_as_one_line(tmp_path):
    """Grain pickles a worker's exception back; BadRecordError must survive that trip."""
    path = tmp_path / "data.jsonl"
    too_long = json.dumps({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "w" * 60}]}).encode()
    _write(path, [GOOD_CHAT, GOOD_CHAT, too_long, GOOD_CHAT])
    dataset = pipeline.build_dataset(_config(path, num_workers=1, num_epochs=1), TOK,
                                     process_index=0, process_count=1)
    with pytest.raises(BadRecordError, match=f"^{path}:3: conversation too long") as caught:
        list(dataset)
    assert caught.value.kind == "overlong" and "\n" not in str(caught.value)


def test_bad_record_error_pickles():
    import pickle

    error = BadRecordError("f.jsonl:3", "malformed JSON", "unreadable")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.origin, copy.reason, copy.kind) == (
        "f.jsonl:3: malformed JSON", "f.jsonl:3", "malformed JSON", "unreadable")


def test_without_keeps_the_other_records_in_order(tmp_path):
    path = tmp_path / "lines.txt"
    _write(path, [b"zero", b"one", b"two", b"three"])
    source = sources.FileLinesSource(str(path))
    kept = source.without([0, 2])
    assert [kept[i]["text"] for i in range(len(kept))] == ["one", "three"]
    assert [kept[i]["_origin"] for i in range(len(kept))] == [f"{path}:2", f"{path}:4"]
    assert len(source) == 4  # the original is unchanged
    assert [i for i, _ in source.iter_records()] == list(np.arange(4))
