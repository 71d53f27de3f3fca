"""Pure-Python parts of the evaluation: cache file, batching, presets, task YAMLs, flag parsing."""

import json
import os
import sys

import pytest

from llada_jax.evaluation.batching import bucketed_batches, padded_size, round_up
from llada_jax.evaluation.cache import RequestCache, request_key
from llada_jax.evaluation.presets import load_preset
from llada_jax.evaluation.tasks import local_task_folder, split_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "tests", "data", "eval_tasks")


def test_cache_round_trip_and_torn_last_line(tmp_path):
    path = str(tmp_path / "c.jsonl")
    cache = RequestCache(path)
    a, b = request_key("loglikelihood", ["x", "y"], "f"), request_key("loglikelihood", ["x", "z"],
                                                                      "f")
    assert a != b and a != request_key("loglikelihood", ["x", "y"], "other settings")
    cache.put_many([(a, [-1.5, False]), (b, [-2.0, False])])
    with open(path, "a") as f:
        f.write('{"key": "half-writt')          # a killed writer
    again = RequestCache(path)
    assert len(again) == 2 and again.get(a) == [-1.5, False]
    with open(path, "w") as f:
        f.write("not json\n" + json.dumps({"key": a, "value": 1}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: not a cache line"):
        RequestCache(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RequestCache(str(tmp_path / "missing" / "c.jsonl"))


def test_batching_groups_by_bucket_and_pads():
    assert [round_up(n, 8) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]
    lengths = [3, 20, 5, 17, 4, 9]
    batches = bucketed_batches(lengths, lambda n: round_up(n, 8), lambda n: n, 2)
    # Longest first; bucket 24 = {20, 17}, 16 = {9}, 8 = {5, 4, 3} cut into 2 + 1.
    assert batches == [(24, [1, 3]), (16, [5]), (8, [2, 4]), (8, [0])]
    assert [padded_size(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert [padded_size(n, 16, multiple=8) for n in (1, 3, 9)] == [8, 8, 16]


def test_presets_carry_settings_and_published_numbers():
    arc = load_preset(os.path.join(REPO, "configs/eval/llada_base.py:arc_challenge"))
    assert (arc.tasks, arc.num_fewshot, arc.model_args.cfg, arc.model_args.mc_num,
            arc.published, arc.published_no_cfg) == ("arc_challenge", 0, 0.5, 128, 47.9, 45.9)
    gsm = load_preset(os.path.join(REPO, "configs/eval/llada_instruct.py:gsm8k_block8"))
    assert (gsm.model_args.gen_length, gsm.model_args.block_length, gsm.published,
            gsm.chat) == (256, 8, 78.6, True)
    with pytest.raises(ValueError, match="expected a task among"):
        load_preset(os.path.join(REPO, "configs/eval/llada_base.py:nope"))
    with pytest.raises(FileNotFoundError, match="--preset: file not found"):
        load_preset("configs/eval/missing.py:x")


def test_local_task_yaml_paths_resolve_against_the_yaml(tmp_path):
    names, files = split_tasks(["gsm8k", os.path.join(TASKS, "copy_letter_mc.yaml"), ""])
    assert names == ["gsm8k"] and len(files) == 1
    folder, defined = local_task_folder(files)
    assert defined == ["copy_letter_mc"]
    with open(os.path.join(folder, "copy_letter_mc.yaml")) as f:
        text = f.read()
    assert os.path.join(TASKS, "copy_letter_mc.jsonl") in text
    with pytest.raises(FileNotFoundError, match="task file not found"):
        split_tasks([str(tmp_path / "none.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: t\ndataset_kwargs:\n  data_files: {test: gone.jsonl}\n")
    with pytest.raises(FileNotFoundError, match=r"bad.yaml: data file not found: .*gone.jsonl"):
        local_task_folder([str(bad)])


def test_model_args_parsing():
    sys.path.insert(0, os.path.join(REPO, "launch"))
    from evaluate import parse_model_args

    assert parse_model_args("gen_length=256,cfg=0.5,chat=true,remasking=random") == {
        "gen_length": 256, "cfg": 0.5, "chat": True, "remasking": "random"}
    with pytest.raises(ValueError, match="expected key=value, found 'oops'"):
        parse_model_args("oops")
