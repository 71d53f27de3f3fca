"""Dumps a few host batches of every data path to an .npz, and compares two dumps bit for bit.

Used to prove that a restructure of `llada_jax/data/` leaves the batches unchanged:

    python tests/datalayer_batches.py dump /tmp/datalayer_before.npz   # on the base commit
    python tests/datalayer_batches.py dump /tmp/datalayer_after.npz    # after the change
    python tests/datalayer_batches.py compare /tmp/datalayer_before.npz /tmp/datalayer_after.npz

Paths: pre-training on the built-in corpus (concat) and on `files:` JSONL (concat and pack),
SFT on synthetic_chat (sample_turn) and on a JSONL of multi-turn conversations (all_responses,
masked_response), LLaDA-V on shapes (stage 2 and stage 1) and on LLaVA JSONL with image files,
and the evaluation batches of each; for one host and for host 1 of 2.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

BATCHES = 3


def _write_inputs(folder: str) -> dict[str, str]:
    from PIL import Image

    from llada_jax.data.synthetic_images import draw_shape

    rng = np.random.default_rng(0)
    text = os.path.join(folder, "docs.jsonl")
    with open(text, "w") as f:
        for i in range(40):
            words = " ".join("".join(chr(97 + int(c)) for c in rng.integers(26, size=4))
                             for _ in range(int(rng.integers(2, 30))))
            f.write(json.dumps({"text": f"doc {i}: {words}"}) + "\n")
    chats = os.path.join(folder, "chats.jsonl")
    with open(chats, "w") as f:
        for i in range(30):
            messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
            for turn in range(1 + i % 3):
                messages += [{"role": "user", "content": f"question {i}.{turn} " * (1 + i % 4)},
                             {"role": "assistant", "content": f"answer {i * turn} " * (1 + i % 5)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    llava = os.path.join(folder, "llava.jsonl")
    with open(llava, "w") as f:
        for i in range(12):
            record: dict = {"conversations": [
                {"from": "human", "value": "What is it? <image>" if i % 2 else "<image>\nColour?"},
                {"from": "gpt", "value": f"shape {i}"}]}
            if i % 4 == 3:
                record["conversations"] += [{"from": "human", "value": "And then?"},
                                            {"from": "gpt", "value": "nothing " * (i % 5)}]
            if i == 11:  # a text-only record
                record["conversations"][0]["value"] = "Colour?"
            if i != 5:  # record 5: an <image> mark without an image (skipped)
                name = f"img{i}.png"
                Image.fromarray(draw_shape(("square", "circle", "triangle")[i % 3], "red",
                                           24 + 4 * i, rng)).save(os.path.join(folder, name))
                record["image"] = name
            f.write(json.dumps(record) + "\n")
    return {"text": text, "chats": chats, "llava": llava}


def _configs(files: dict[str, str]):
    import importlib.util

    def preset(name: str):
        spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()

    def pretrain_tiny():
        c = preset("tiny")
        c.train.batch_size, c.train.seq_len = 4, 32
        return c

    def pretrain_files(packing: str):
        c = pretrain_tiny()
        c.data.source = c.data.eval_source = f"files:{files['text']}"
        c.data.packing = packing
        c.data.add_bos = packing == "pack"
        return c

    def sft_synthetic():
        c = preset("sft_tiny")
        c.train.batch_size = 4
        return c

    def sft_files():
        c = preset("sft_tiny")
        c.train.batch_size, c.train.seq_len = 4, 96
        c.train.objective = "masked_response"
        c.data.sft_multiturn = "all_responses"
        c.data.source = c.data.eval_source = f"files:{files['chats']}"
        c.data.bad_records = "skip"
        return c

    def sft_mix():
        c = sft_synthetic()
        c.train.seq_len = 96
        c.data.source = f"mix:synthetic_chat=0.5,files:{files['chats']}=0.5"
        return c

    def llada_v(stage: int):
        c = preset("llada_v_tiny")
        if stage == 1:
            c.data.conversation_format = "llada_plain"
            c.data.label_eos_padding = None
        c.train.batch_size = 4
        return c

    def llava_files():
        c = llada_v(2)
        c.train.seq_len = 128
        c.data.source = c.data.eval_source = f"files:{files['llava']}"
        c.data.label_eos_padding = None
        c.data.system_message = "Look."
        c.data.bad_records = "skip"
        return c

    return {"pretrain_synthetic": pretrain_tiny(), "pretrain_files_concat":
            pretrain_files("concat"), "pretrain_files_pack": pretrain_files("pack"),
            "sft_synthetic_chat": sft_synthetic(), "sft_files": sft_files(),
            "sft_mix": sft_mix(), "llada_v_shapes": llada_v(2),
            "llada_v_shapes_stage1": llada_v(1), "llada_v_llava_files": llava_files()}


def dump(path: str) -> None:
    import jax

    from llada_jax.data import pipeline
    from llada_jax.data.tokenizer import CharTokenizer

    tokenizer = CharTokenizer()
    arrays = {}
    # Host 1 of 2 as well: every builder reads jax.process_index() / process_count().
    for host, hosts in ((0, 1), (1, 2)):
        jax.process_index, jax.process_count = (lambda h=host: h), (lambda n=hosts: n)
        _dump_host(arrays, "" if hosts == 1 else "host1of2/", tokenizer, pipeline)
    np.savez(path, **arrays)
    print(f"{len(arrays)} arrays -> {path}")


def _dump_host(arrays: dict, prefix: str, tokenizer, pipeline) -> None:
    # A fixed folder that outlives the iterators: grain keeps prefetching in threads.
    folder = os.path.join(tempfile.gettempdir(), "datalayer_batches_inputs")
    os.makedirs(folder, exist_ok=True)
    if True:
        for name, config in _configs(_write_inputs(folder)).items():
            for kind in ("train", "eval"):
                iterator = iter(pipeline.build_dataset(config, tokenizer, kind))
                for b in range(BATCHES):
                    for field, value in next(iterator).items():
                        arrays[f"{prefix}{name}/{kind}/{b}/{field}"] = np.asarray(value)


def compare(before: str, after: str) -> int:
    a, b = np.load(before), np.load(after)
    problems = [f"only in {before}: {k}" for k in sorted(set(a) - set(b))]
    problems += [f"only in {after}: {k}" for k in sorted(set(b) - set(a))]
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            problems.append(f"differs: {key} {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
    print("\n".join(problems) or f"all {len(a)} arrays bit-identical")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
