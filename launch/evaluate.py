"""Likelihood and multiple-choice evaluation of a checkpoint (Monte Carlo ELBO, REFERENCE.md s. 4).

    python launch/evaluate.py --checkpoint=/ckpt/llada --data=eval.jsonl --mc_num=128

`--data` is a JSON-lines file; each line is either
  {"prompt": "...", "answer": "..."}                       -> log-likelihood of the answer, or
  {"question": "...", "choices": ["...", ...], "label": i}  -> multiple choice (highest wins).
Prints one JSON line: for likelihood records their number, mean log-likelihood, negative
log-likelihood per answer token and the perplexity bound exp(NLL per token); for multiple-choice
records their number and accuracy. `--output` writes one JSON line per record with its scores.
Single-token answers need only `--mc_num=1` (the estimate is then exact).
"""

from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import numpy as np
import program
from absl import flags

from llada_jax import parallel
from llada_jax.config import default_config
from llada_jax.data.tokenizer import load_tokenizer
from llada_jax.diffusion.likelihood import log_likelihood, multiple_choice
from llada_jax.train import checkpoint, state

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "params checkpoint or trainer workdir",
                                  required=True)
_STEP = flags.DEFINE_integer("step", None, "trainer step to load (default: the latest)")
_DATA = flags.DEFINE_string("data", None, "JSON-lines evaluation file", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "tokenizer spec (default: the checkpoint's config.data.tokenizer)")
_MC_NUM = flags.DEFINE_integer("mc_num", 128, "Monte Carlo samples per answer")
_MC_BATCH_SIZE = flags.DEFINE_integer("mc_batch_size", 16, "Monte Carlo samples per batch "
                                      "(stratified mask counts); must divide --mc_num")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 0.0, "classifier-free guidance scale")
_PAIRS_PER_CALL = flags.DEFINE_integer("pairs_per_call", 8, "(prompt, answer) pairs per call")
_PAD_MULTIPLE = flags.DEFINE_integer("pad_multiple", 16, "pad prompt and answer widths to a "
                                     "multiple of this (fewer compilations)")
_CHAT = flags.DEFINE_bool("chat", False, "wrap prompts/questions as a user turn of the chat format")
_ADD_BOS = flags.DEFINE_bool("add_bos", True, "start plain prompts with BOS")
_SEED = flags.DEFINE_integer("seed", 0, "Monte Carlo seed")
_OUTPUT = flags.DEFINE_string("output", None, "write one JSON line of scores per record")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "fsdp mesh axis (-1: every device)")


def read_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data file not found: {path}")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            likelihood = isinstance(record.get("prompt"), str) and isinstance(
                record.get("answer"), str)
            choice = (isinstance(record.get("question"), str)
                      and isinstance(record.get("choices"), list) and record["choices"]
                      and isinstance(record.get("label"), int))
            if not (likelihood or choice):
                raise ValueError(f"{path}:{number}: expected {{'prompt', 'answer'}} or "
                                 f"{{'question', 'choices', 'label'}}, found keys "
                                 f"{sorted(record)}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def main(argv: list[str]) -> None:
    del argv
    records = read_records(_DATA.value)
    mesh_config = default_config()
    mesh_config.mesh.fsdp = _MESH_FSDP.value
    mesh = parallel.make_mesh(mesh_config)
    config, params = checkpoint.load_params(_CHECKPOINT.value, _STEP.value, mesh=mesh)
    tokenizer = load_tokenizer(_TOKENIZER.value or config.data.tokenizer)
    model = state.make_model(config)

    def context_ids(text: str) -> list[int]:
        if _CHAT.value:
            return tokenizer.render_chat([{"role": "user", "content": text}])
        return ([tokenizer.bos_id] if _ADD_BOS.value else []) + tokenizer.encode(text)

    options = {"mc_num": _MC_NUM.value, "batch_size": _MC_BATCH_SIZE.value,
                   "cfg_scale": _CFG_SCALE.value, "mask_id": config.model.mask_token_id,
                   "pad_id": tokenizer.pad_id, "pairs_per_call": _PAIRS_PER_CALL.value,
                   "pad_multiple": _PAD_MULTIPLE.value}
    rng = jax.random.key(_SEED.value)
    likelihood_records = [r for r in records if "answer" in r]
    choice_records = [r for r in records if "choices" in r]
    summary: dict = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.logical_rules(config)):
        if likelihood_records:
            answers = [tokenizer.encode(r["answer"]) for r in likelihood_records]
            estimates = log_likelihood(params, model,
                                       [context_ids(r["prompt"]) for r in likelihood_records],
                                       answers, jax.random.fold_in(rng, 0), **options)
            tokens = sum(len(a) for a in answers)
            nll_per_token = -float(np.sum(estimates)) / tokens
            summary["likelihood"] = {
                "records": len(likelihood_records),
                "mean_log_likelihood": float(np.mean(estimates)),
                "nll_per_token": nll_per_token,
                "perplexity_bound": math.exp(min(nll_per_token, 700.0)),
            }
            for record, estimate in zip(likelihood_records, estimates, strict=True):
                record["log_likelihood"] = float(estimate)
        if choice_records:
            result = multiple_choice(
                params, model, [context_ids(r["question"]) for r in choice_records],
                [[tokenizer.encode(c) for c in r["choices"]] for r in choice_records],
                jax.random.fold_in(rng, 1), labels=[r["label"] for r in choice_records],
                **options)
            summary["multiple_choice"] = {"records": len(choice_records),
                                          "accuracy": result["accuracy"]}
            for record, scores, prediction in zip(choice_records, result["scores"],
                                                  result["predictions"], strict=True):
                record["scores"] = [float(s) for s in scores]
                record["prediction"] = int(prediction)
    print(json.dumps(summary), flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    program.run(main)
