"""Evaluation of a checkpoint: lm-eval benchmarks (--tasks) or a file of prompts (--data).

    python launch/evaluate.py --checkpoint=/ckpt/llada --tasks=arc_challenge,gsm8k --limit=100
    python launch/evaluate.py --checkpoint=/ckpt/llada \
        --preset=configs/eval/llada_base.py:arc_challenge --cache=/tmp/arc.jsonl
    python launch/evaluate.py --checkpoint=/ckpt/llada --data=eval.jsonl --mc_num=128

Benchmarks (`--tasks` or `--preset`): lm-eval task names and/or local task YAML files run through
lm-evaluation-harness with the `llada_jax` model (llada_jax/evaluation/lm.py). `--preset` takes a
task's official settings from configs/eval/ and prints the published score next to ours.
`--model_args=k=v,...` sets any model argument (sampler fields too); `--apply_chat_template`
renders every context (few-shot examples as turns) with the LLaDA chat template, lm-eval's path
for instruct models; batches fill the mesh of every device (`--mesh_fsdp`); `--cache` keeps finished
requests so an interrupted run continues where it stopped; progress lines give requests/s and
the ETA; the results table goes to stdout and `--results_json` gets the whole result.

Prompt file (`--data`):
`--data` is a JSON-lines file; each line is either
  {"prompt": "...", "answer": "..."}                       -> log-likelihood of the answer, or
  {"question": "...", "choices": ["...", ...], "label": i}  -> multiple choice (highest wins).
Prints one JSON line: for likelihood records their number, mean log-likelihood, negative
log-likelihood per answer token and the perplexity bound exp(NLL per token); for multiple-choice
records their number and accuracy. `--output` writes one JSON line per record with its scores.
Single-token answers need only `--mc_num=1` (the estimate is then exact); a `--mc_num` below
`--mc_batch_size` runs batches of `--mc_num` samples (a note says so).

Context and continuation are tokenised jointly, the official way (lm-evaluation-harness,
LLaDA's `eval_llada.py`): trailing whitespace of the prompt/question moves into the answer, and
the answer is what the joint tokenisation adds after the prompt's tokens
(`llada_jax.data.eval_records.encode_pair`). With `--chat` the prompt is a rendered user turn
ending in the assistant header, a special-token boundary: the answer is tokenised on its own.
A bad record is one error line naming `file:line`.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import program
from absl import flags

from llada_jax import parallel
from llada_jax.data.eval_records import encode_requests, read_eval_records
from llada_jax.diffusion.likelihood import log_likelihood, multiple_choice
from llada_jax.generation import Generator

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "params checkpoint or trainer workdir",
                                  required=True)
_STEP = flags.DEFINE_integer("step", None, "trainer step to load (default: the latest)")
_DATA = flags.DEFINE_string("data", None, "JSON-lines evaluation file (prompt-file mode)")
_TASKS = flags.DEFINE_string("tasks", None, "comma-separated lm-eval task names and/or local "
                             "task YAML files (benchmark mode)")
_PRESET = flags.DEFINE_string("preset", None, "official task settings, configs/eval/<file>.py:"
                              "<task> (benchmark mode; --tasks and flags override it)")
_LIMIT = flags.DEFINE_float("limit", None, "documents per task (a fraction when below 1)")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "few-shot examples (default: the "
                                    "preset's, else the task's)")
_MODEL_ARGS = flags.DEFINE_string("model_args", "", "extra llada_jax model arguments k=v,... "
                                  "(e.g. gen_length=256,block_length=8,steps=256)")
_APPLY_CHAT_TEMPLATE = flags.DEFINE_bool(
    "apply_chat_template", False, "benchmark mode: render each context (few-shot examples as "
    "turns) with the LLaDA chat template, lm-eval's path for instruct models")
_CACHE = flags.DEFINE_string("cache", None, "JSONL cache of finished requests (resumable)")
_RESULTS_JSON = flags.DEFINE_string("results_json", None, "write the lm-eval results as JSON")
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


def mc_batch_size(mc_num: int, batch_size: int) -> int:
    """The Monte Carlo batch: --mc_batch_size, or --mc_num when that is smaller (said once)."""
    if mc_num <= 0:
        raise ValueError(f"--mc_num must be a positive integer, found {mc_num}")
    if batch_size <= 0:
        raise ValueError(f"--mc_batch_size must be a positive integer, found {batch_size}")
    if mc_num < batch_size:
        print(f"note: --mc_num={mc_num} is below --mc_batch_size={batch_size}; using batches of "
              f"{mc_num}", flush=True)
        return mc_num
    if mc_num % batch_size:
        raise ValueError(f"--mc_num={mc_num} must be a multiple of --mc_batch_size={batch_size} "
                         f"(the stratified mask counts are per batch); change either flag")
    return batch_size


def parse_model_args(text: str) -> dict:
    """`k=v,k2=v2` -> dict with ints, floats and booleans converted (one error line per item)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model_args: expected key=value, found {item!r}")
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
            continue
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def run_benchmarks() -> None:
    """Benchmark mode: lm-eval tasks through the llada_jax model."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    from llada_jax.evaluation.lm import LladaJaxLM
    from llada_jax.evaluation.presets import load_preset
    from llada_jax.evaluation.tasks import load_tasks

    preset = load_preset(_PRESET.value) if _PRESET.value else None
    names, task_manager = load_tasks(
        (_TASKS.value or (preset.tasks if preset else "")).split(","))
    model_args = dict(preset.model_args) if preset else {}
    if preset is not None and preset.get("chat"):
        model_args["chat"] = True
    for flag, arg in ((_MC_NUM, "mc_num"), (_MC_BATCH_SIZE, "mc_batch_size"),
                      (_CFG_SCALE, "cfg"), (_PAIRS_PER_CALL, "pairs_per_call"),
                      (_PAD_MULTIPLE, "pad_multiple"), (_CHAT, "chat"), (_ADD_BOS, "add_bos"),
                      (_SEED, "seed")):
        if flags.FLAGS[flag.name].present:
            model_args[arg] = flag.value
    model_args.update(parse_model_args(_MODEL_ARGS.value))
    num_fewshot = _NUM_FEWSHOT.value
    if num_fewshot is None and preset is not None:
        num_fewshot = preset.get("num_fewshot")
    limit = _LIMIT.value
    if limit is not None and limit >= 1:
        limit = int(limit)
    # The model fills the mesh: its batches are a multiple of the mesh's batch axes.
    lm = LladaJaxLM(checkpoint=_CHECKPOINT.value, step=_STEP.value, tokenizer=_TOKENIZER.value,
                    cache_path=_CACHE.value, mesh=parallel.make_mesh(fsdp=_MESH_FSDP.value),
                    **model_args)
    out = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                          task_manager=task_manager, log_samples=False,
                          apply_chat_template=_APPLY_CHAT_TEMPLATE.value)
    if out is None:   # not the main process of a multi-host run
        return
    print(make_table(out), flush=True)
    # The batch sizes as run: rounded up to a multiple of the mesh's batch axes.
    batches = {"pairs_per_call": lm.pairs_per_call, "gen_batch_size": lm.gen_batch_size}
    summary = {"results": out["results"], "n-shot": out.get("n-shot"),
               "model_args": model_args | batches,
               "checkpoint": _CHECKPOINT.value, "limit": limit}
    if preset is not None:
        summary["preset"] = preset.to_dict()
        print(f"published ({preset.get('model', 'model')}, {preset.tasks}): "
              f"{preset.published}", flush=True)
    if _RESULTS_JSON.value:
        with open(_RESULTS_JSON.value, "w") as f:
            json.dump(summary, f, indent=2, default=str)


def main(argv: list[str]) -> None:
    del argv
    if bool(_DATA.value) == bool(_TASKS.value or _PRESET.value):
        raise ValueError("give either --data (a prompt file) or --tasks / --preset (lm-eval "
                         "benchmarks), not both and not neither")
    parallel.maybe_initialize_distributed()   # several hosts: one process each
    if _TASKS.value or _PRESET.value:
        run_benchmarks()
        return
    located = read_eval_records(_DATA.value)
    records = [record for _, record in located]
    batch_size = mc_batch_size(_MC_NUM.value, _MC_BATCH_SIZE.value)
    for flag in (_PAIRS_PER_CALL, _PAD_MULTIPLE):
        if flag.value <= 0:
            raise ValueError(f"--{flag.name} must be a positive integer, found {flag.value}")
    output = None
    if _OUTPUT.value:   # opened now: an unwritable path fails before the evaluation, not after
        try:
            output = open(_OUTPUT.value, "w")
        except OSError as e:
            raise ValueError(f"--output={_OUTPUT.value}: cannot write it ({e.strerror})") from None
    generator = Generator.load(_CHECKPOINT.value, step=_STEP.value, tokenizer=_TOKENIZER.value,
                               mesh=parallel.make_mesh(fsdp=_MESH_FSDP.value))
    config, params, model = generator.config, generator.params, generator.model
    tokenizer = generator.tokenizer

    def encode(pairs: list[tuple[str, str, str]]) -> tuple[list[list[int]], list[list[int]]]:
        """(where, context, continuation) -> (context ids, continuation ids)."""
        if _CHAT.value:
            contexts = [generator.encode_prompt(context, chat=True) for _, context, _ in pairs]
            continuations = [tokenizer.encode(continuation) for _, _, continuation in pairs]
            for (where, _, continuation), ids in zip(pairs, continuations, strict=True):
                if not ids:
                    raise ValueError(f"{where}: the answer {continuation!r} has no tokens")
            return contexts, continuations
        prefix = [tokenizer.bos_id] if _ADD_BOS.value else []
        return encode_requests(tokenizer, [c for _, c, _ in pairs], [a for _, _, a in pairs],
                               prefix, [w for w, _, _ in pairs])

    options = {"mc_num": _MC_NUM.value, "batch_size": batch_size,
                   "cfg_scale": _CFG_SCALE.value, "mask_id": config.model.mask_token_id,
                   "pad_id": tokenizer.pad_id, "pairs_per_call": _PAIRS_PER_CALL.value,
                   "pad_multiple": _PAD_MULTIPLE.value}
    rng = jax.random.key(_SEED.value)
    likelihood_located = [(w, r) for w, r in located if "answer" in r]
    choice_located = [(w, r) for w, r in located if "choices" in r]
    likelihood_records = [r for _, r in likelihood_located]
    choice_records = [r for _, r in choice_located]
    summary: dict = {}
    with generator.mesh_context():
        if likelihood_records:
            contexts, answers = encode([(w, r["prompt"], r["answer"])
                                        for w, r in likelihood_located])
            estimates = log_likelihood(params, model, contexts, answers,
                                       jax.random.fold_in(rng, 0), **options)
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
            questions, options_ids = [], []
            for where, record in choice_located:
                contexts, choices = encode([(f"{where} (choice {n})", record["question"], c)
                                            for n, c in enumerate(record["choices"])])
                if any(c != contexts[0] for c in contexts):
                    # The question's own tokens never depend on the choice (it is tokenised
                    # alone); guard the assumption multiple_choice makes of one context.
                    raise ValueError(f"{where}: the question tokenises differently per choice")
                questions.append(contexts[0])
                options_ids.append(choices)
            result = multiple_choice(
                params, model, questions, options_ids,
                jax.random.fold_in(rng, 1), labels=[r["label"] for r in choice_records],
                **options)
            summary["multiple_choice"] = {"records": len(choice_records),
                                          "accuracy": result["accuracy"]}
            for record, scores, prediction in zip(choice_records, result["scores"],
                                                  result["predictions"], strict=True):
                record["scores"] = [float(s) for s in scores]
                record["prediction"] = int(prediction)
    print(json.dumps(summary), flush=True)
    if output is not None:
        with output:
            for record in records:
                output.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    program.run(main)
