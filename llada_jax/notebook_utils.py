"""What the notebooks in `notebooks/` share, so that their cells stay one or two library calls.

* which accelerator is here (`detect_backend`) and which run length fits it (`load_config`):
  the presets as they are on a TPU, a GPU or a CPU, cut to a few dozen steps when
  `LLADA_NOTEBOOK_TINY=1` (what CI runs, `tests/test_notebooks.py`);
* a Hugging Face LLaDA checkpoint as (config, model, params, tokenizer) on a mesh
  (`load_hf_checkpoint`), for the notebooks' "bring your own weights" path;
* text in, text out with the one sampler, sharded on the mesh (`generate_text`, plain or with
  the chat template; `answer_about_images` for LLaDA-V);
* small data the notebooks write and score: a `messages` JSONL file from the built-in chat set
  (`write_chat_jsonl`), a multiple-choice set built from its held-out questions
  (`synthetic_multiple_choice`, scored by `score_multiple_choice`);
* what a notebook displays: the mesh and the shards of a few params (`sharding_table`), a loss
  curve (`plot_losses`).

Nothing here trains, samples or converts by itself: those are `train.trainer`, `diffusion.*` and
`interop.hf`, called unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from llada_jax import config as config_lib
from llada_jax import parallel
from llada_jax.data import synthetic_chat
from llada_jax.data.tokenizer import Tokenizer, load_tokenizer
from llada_jax.diffusion.sampler import SamplerConfig, generate, pad_prompts

TINY_ENV = "LLADA_NOTEBOOK_TINY"
# The repository root of an editable install (a clone): where `configs/` lives.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Backend:
    """The accelerator a notebook runs on, and whether the tiny CI settings are forced."""

    platform: str        # 'tpu' | 'gpu' | 'cpu'
    device_count: int    # devices of every process
    device_kind: str     # e.g. 'TPU v5 lite', 'NVIDIA A100-SXM4-40GB', 'cpu'
    process_count: int
    tiny: bool           # LLADA_NOTEBOOK_TINY=1: a few dozen steps, whatever the accelerator

    def __str__(self) -> str:
        mode = " (tiny CI settings: LLADA_NOTEBOOK_TINY=1)" if self.tiny else ""
        return (f"{self.platform.upper()}: {self.device_count} x {self.device_kind}, "
                f"{self.process_count} process(es){mode}")


def tiny_mode() -> bool:
    """True when `LLADA_NOTEBOOK_TINY=1` (also 'true'/'yes'); any other value is False."""
    return os.environ.get(TINY_ENV, "").strip().lower() in ("1", "true", "yes")


def detect_backend() -> Backend:
    """The default JAX backend of this runtime (Colab TPU / GPU / CPU)."""
    devices = jax.devices()
    return Backend(platform=jax.default_backend(), device_count=len(devices),
                   device_kind=devices[0].device_kind, process_count=jax.process_count(),
                   tiny=tiny_mode())


def load_preset(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`configs/<name>.py`'s `get_config(arg)` (configs/ is a folder of files, not a package)."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config preset {name!r} not found: expected {path} (the "
                                f"notebooks run from a clone of the repository)")
    spec = importlib.util.spec_from_file_location(f"llada_jax_preset_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def load_config(name: str, backend: Backend, *, tiny_steps: int = 40,
                arg: str | None = None) -> ml_collections.ConfigDict:
    """A preset sized for `backend`.

    On a TPU, a GPU or a plain CPU runtime the preset runs as written (its full length: seconds
    to minutes for the tiny presets). With `backend.tiny` it is cut to `tiny_steps` updates with
    no periodic evaluation and one checkpoint at the end, so a notebook runs in well under a
    minute on two CPU cores.
    """
    if not isinstance(tiny_steps, int) or tiny_steps <= 0:
        raise ValueError(f"tiny_steps: expected a positive integer, found {tiny_steps!r}")
    config = load_preset(name, arg)
    if backend.tiny:
        train = config.train
        train.steps = tiny_steps
        train.warmup_steps = min(train.warmup_steps, max(tiny_steps // 4, 1))
        train.log_every = max(tiny_steps // 4, 1)
        train.eval_every = 0
        train.checkpoint_every = 0  # the trainer still saves once, at the end
    return config


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints.


def load_hf_checkpoint(hf_dir: str, *, tokenizer: str | None = None, mesh=None,
                       param_dtype: str | None = None, dtype: str | None = None):
    """(config, model, params, tokenizer) of a Hugging Face LLaDA checkpoint directory.

    The config is the library defaults with the model section of the checkpoint's config.json;
    params are placed on `mesh` (default: fsdp over every device) by the project's rule table.
    `param_dtype`: the params' dtype (default: the checkpoint's); `dtype`: the compute dtype
    (default: the library's float32; 'bfloat16' on TPUs and GPUs).
    `tokenizer`: a tokenizer spec; default `hf:hf_dir`, which needs a `tokenizer.json` there
    (the released checkpoints have one; an export of a model trained with the built-in character
    tokenizer needs `tokenizer='char'`).
    """
    from llada_jax.interop import hf
    from llada_jax.train.state import make_model

    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF_CHECKPOINT: directory not found: {hf_dir}")
    if tokenizer is None:
        if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
            raise FileNotFoundError(f"{hf_dir} has no tokenizer.json; pass tokenizer= (e.g. "
                                    f"'char' or 'hf:DIR')")
        tokenizer = "hf:" + os.path.abspath(hf_dir)
    config = config_lib.default_config()
    mesh = parallel.make_mesh(config) if mesh is None else mesh
    model_config, params = hf.import_hf(hf_dir, mesh=mesh, rules=parallel.logical_rules(config),
                                        param_dtype=param_dtype,
                                        overrides=None if dtype is None else {"dtype": dtype})
    for name, value in dataclasses.asdict(model_config).items():
        config.model[name] = value
    config.data.tokenizer = tokenizer
    config.train.seq_len = min(config.train.seq_len, model_config.max_sequence_length)
    config_lib.validate(config)
    loaded = load_tokenizer(tokenizer)
    if loaded.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {loaded.vocab_size} ids but the "
                         f"checkpoint's vocab_size is {model_config.vocab_size}")
    return config, make_model(config), params, loaded


# ----------------------------------------------------------------------------------------------
# Text in, text out.


@contextlib.contextmanager
def mesh_context(mesh, rules):
    """`jax.set_mesh(mesh)` and the logical-axis rules: how every jitted call here is sharded."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def answer_ids(generated: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """Generated ids up to (without) the first EOS or <|eot_id|>."""
    out = []
    for token in generated:
        if int(token) in (tokenizer.eos_id, tokenizer.eot_id):
            break
        out.append(int(token))
    return out


def generate_ids(params: Any, model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                 sampler: SamplerConfig, *, mesh, rules, pad_id: int, seed: int = 0,
                 image_conversations: Sequence[Any] | None = None,
                 vision: ml_collections.ConfigDict | None = None) -> np.ndarray:
    """Generated ids int32 [N, gen_length] after each prompt (id lists).

    The batch is left-padded and filled up to a multiple of the mesh's batch axes by repeating
    the last prompt (those rows are dropped), then sampled sharded over (data, fsdp). LLaDA-V:
    `image_conversations` holds one `multimodal_data.EncodedConversation` per prompt (its ids
    are the prompt, placeholders included) and `vision` the config's vision section.
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompts: expected at least one prompt, found none")
    tokens, mask = pad_prompts(prompt_ids, pad_id)
    count = len(prompt_ids)
    rows = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
    extra = -(-count // rows) * rows - count
    tokens = np.concatenate([tokens, np.repeat(tokens[-1:], extra, axis=0)])
    mask = np.concatenate([mask, np.repeat(mask[-1:], extra, axis=0)])
    host_batch = {"tokens": tokens, "mask": mask}
    if image_conversations is not None:
        from llada_jax.data import multimodal_data
        from llada_jax.model.multimodal import IMAGE_FIELDS

        if len(image_conversations) != count or vision is None:
            raise ValueError(f"image_conversations: expected one per prompt ({count}) and the "
                             f"config's vision section, found {len(image_conversations)}")
        canvas = np.concatenate(
            [tokens, np.full((len(tokens), sampler.gen_length), sampler.mask_id, np.int32)], 1)
        conversations = list(image_conversations) + [image_conversations[-1]] * extra
        host_batch.update(multimodal_data.image_inputs(
            canvas, conversations, vision.max_views, vision.image_size,
            (vision.image_size // vision.patch_size) ** 2))
    with mesh_context(mesh, rules):
        batch = parallel.global_batch(host_batch, mesh)
        images = None
        if image_conversations is not None:
            images = [batch[k] for k in IMAGE_FIELDS]
        out = generate(params, model, batch["tokens"], batch["mask"], sampler,
                       jax.random.key(seed), images=images)
    return np.asarray(jax.device_get(out))[:count, tokens.shape[1]:]


def generate_text(params: Any, model: nn.Module, tokenizer: Tokenizer, prompts: Sequence,
                  sampler: SamplerConfig, *, mesh, rules, chat: bool = False,
                  seed: int = 0) -> list[str]:
    """Completions of `prompts` (strings; with `chat`, a string is one user turn and a list of
    `{"role", "content"}` dicts is a whole conversation), each cut at its first EOS / EoT.

    Plain prompts start with BOS, as the pre-training documents do with `data.add_bos`; chat
    prompts are rendered with the chat template up to the assistant header.
    """
    if isinstance(prompts, (str, dict)):
        raise ValueError("prompts: expected a list of prompts, found a single one; wrap it in "
                         "a list")
    ids = []
    for prompt in prompts:
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
                else list(prompt)
            ids.append(tokenizer.render_chat(messages, add_generation_prompt=True))
        else:
            if not isinstance(prompt, str):
                raise ValueError(f"prompts: plain prompts must be strings, found {prompt!r} "
                                 f"(pass chat=True for conversations)")
            ids.append([tokenizer.bos_id, *tokenizer.encode(prompt)])
    generated = generate_ids(params, model, ids, sampler, mesh=mesh, rules=rules,
                             pad_id=tokenizer.pad_id, seed=seed)
    return [tokenizer.decode(answer_ids(row, tokenizer)) for row in generated]


def image_conversation(tokenizer: Tokenizer, config: ml_collections.ConfigDict, image: Any,
                       question: str):
    """One user turn `<image>\\n{question}` about `image` (a path, a PIL image or uint8
    [H, W, 3]), rendered for LLaDA-V up to the assistant header in the config's conversation
    template (`data.conversation_format`; by default BOS, the LLaVA system turn, then the turn,
    as LLaDA-V prompts at inference): a `multimodal_data.EncodedConversation` (its `ids` hold
    the image's placeholder positions)."""
    from llada_jax.data import multimodal_data

    messages = [{"role": "user", "content": f"{multimodal_data.IMAGE_MARK}\n{question}"}]
    return multimodal_data.encode_conversation(
        messages, [image], tokenizer, multimodal_data.ImageProcessor.from_config(config),
        add_generation_prompt=True)


def answer_about_images(params: Any, model: nn.Module, tokenizer: Tokenizer,
                        config: ml_collections.ConfigDict, images: Sequence[Any],
                        questions: Sequence[str], sampler: SamplerConfig, *, mesh, rules,
                        seed: int = 0) -> list[str]:
    """LLaDA-V's answer to each (image, question) pair, cut at its first EOS / EoT."""
    if len(images) != len(questions):
        raise ValueError(f"answer_about_images: {len(images)} images but {len(questions)} "
                         f"questions")
    conversations = [image_conversation(tokenizer, config, image, question)
                     for image, question in zip(images, questions, strict=True)]
    generated = generate_ids(params, model, [c.ids for c in conversations], sampler, mesh=mesh,
                             rules=rules, pad_id=tokenizer.pad_id, seed=seed,
                             image_conversations=conversations, vision=config.vision)
    return [tokenizer.decode(answer_ids(row, tokenizer)) for row in generated]


# ----------------------------------------------------------------------------------------------
# Data the notebooks write and score.


def write_chat_jsonl(path: str, num_conversations: int, split: str = "train") -> str:
    """Writes the first `num_conversations` of the built-in chat set as `messages` JSONL.

    Each line is `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, the format
    `configs/sft.py` reads with `data.source='files:PATH'`. Returns `path`.
    """
    if not isinstance(num_conversations, int) or num_conversations <= 0:
        raise ValueError(f"num_conversations: expected a positive integer, found "
                         f"{num_conversations!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for index in range(num_conversations):
            question, answer = synthetic_chat.question_answer(split, index)
            record = {"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": answer}]}
            f.write(json.dumps(record) + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """One question: the user's text, its options, and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    label: int


def synthetic_multiple_choice(num_questions: int, split: str = "test") -> list[MultipleChoice]:
    """Multiple-choice items from the built-in chat set's questions (held-out by default).

    The options of a question about a word are the answers of every task to that word ("Reverse
    kfb": bfk, kfb, KFB, k, b), duplicates removed, in a fixed order; one is right. A model that
    only knows the answer format scores about 1 / (number of options).
    """
    if not isinstance(num_questions, int) or num_questions <= 0:
        raise ValueError(f"num_questions: expected a positive integer, found {num_questions!r}")
    items = []
    for index in range(num_questions):
        question, answer = synthetic_chat.question_answer(split, index)
        word = question.rsplit(" ", 1)[-1]
        # The answer of each task to the same word (the question's own task included).
        options = [synthetic_chat.task_question_answer(task, word)[1]
                   for task in synthetic_chat.TASKS]
        choices = tuple(dict.fromkeys(options))
        items.append(MultipleChoice(question, choices, choices.index(answer)))
    return items


# ----------------------------------------------------------------------------------------------
# Display.


def sharding_table(params: Any, limit: int = 6) -> list[dict[str, Any]]:
    """The first `limit` params: path, global shape, PartitionSpec and one device's shard shape."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0][:limit]:
        sharding = leaf.sharding
        spec = getattr(sharding, "spec", None)
        rows.append({"param": "/".join(str(getattr(k, "key", k)) for k in path),
                     "shape": tuple(leaf.shape),
                     "spec": str(spec) if spec is not None else type(sharding).__name__,
                     "shard_shape": tuple(sharding.shard_shape(leaf.shape))})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as an aligned text table."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [keys] + [[str(row[k]) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                     for line in cells)


def plot_losses(history: Sequence[dict[str, float]],
                eval_history: Sequence[dict[str, float]] = (), title: str = "training loss"):
    """A matplotlib figure of the per-step loss (and its running mean, and eval points)."""
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("plot_losses: the history is empty (no step was run)")
    steps = np.asarray([h["step"] for h in history]) + 1
    losses = np.asarray([h["loss"] for h in history])
    window = max(1, len(losses) // 10)
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps[window - 1:], running, label=f"running mean ({window} steps)")
    if eval_history:
        ax.plot([e["step"] + 1 for e in eval_history], [e["loss"] for e in eval_history], "o",
                label="eval loss")
    ax.set_xlabel("update")
    ax.set_ylabel("masked-token loss")
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    return figure


def chat_pairs(tokenizer: Tokenizer, question: str,
               answers: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, answer ids per answer) of one user question in the chat template.

    The prompt ends with the assistant header; each answer is its text followed by
    `<|eot_id|>`, the way an SFT model was trained to end a turn.
    """
    prompt = tokenizer.render_chat([{"role": "user", "content": question}],
                                   add_generation_prompt=True)
    return prompt, [[*tokenizer.encode(answer), tokenizer.eot_id] for answer in answers]


def score_multiple_choice(params: Any, model: nn.Module, tokenizer: Tokenizer,
                          items: Sequence[MultipleChoice], *, mesh, rules, mc_num: int = 128,
                          batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """`likelihood.multiple_choice` of chat-formatted items, sharded on `mesh`.

    Returns its dict: "scores" (one array of estimates per question), "predictions" and
    "accuracy".
    """
    from llada_jax.diffusion import likelihood

    contexts, choices = [], []
    for item in items:
        prompt, answers = chat_pairs(tokenizer, item.question, item.choices)
        contexts.append(prompt)
        choices.append(answers)
    with mesh_context(mesh, rules):
        return likelihood.multiple_choice(params, model, contexts, choices, jax.random.key(seed),
                                          labels=[item.label for item in items], mc_num=mc_num,
                                          batch_size=batch_size)


def strip_outputs(path: str) -> None:
    """Removes outputs, execution counts and execution timings from a notebook file, in place:
    how the notebooks are committed (tests/test_notebooks.py checks it)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)
