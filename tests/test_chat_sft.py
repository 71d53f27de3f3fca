"""SFT rows against the official recipe: the released chat template, EOS padding and `fill`.

Expected rows are written by hand, or rendered by the real chat template of the released
tokenizer (tests/data/hf_reference, rendered with jinja2 as transformers renders it) and turned
into ids by the tokenizer's own definition (the built-in character tokenizer: 9 special tokens,
then `string.printable`; a word-level Hugging Face vocabulary holding the real special ids).
The project's rendering helpers (`render_chat`, `render_turn`, `header`) are never used to build
an expected value. The official SFT batch (GUIDELINES.md of ML-GSAI/LLaDA; paper appendix B.1):
each example is the prompt, the answer and its <|eot_id|>; the short examples of a mini-batch are
padded with EOS up to the longest one; the answer length counts everything after the prompt,
that EOS padding included.
"""

import collections
import json
import os
import re
import shutil
import string

import jax
import jinja2.sandbox
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from llada_jax.config import default_config
from llada_jax.data import bad_records, pipeline, synthetic_chat
from llada_jax.data.chat import BadRecordError, build_sft_example, parse_messages
from llada_jax.data.tokenizer import CharTokenizer, load_tokenizer
from llada_jax.diffusion.noise import forward_process

TOK = CharTokenizer()
REAL_CONFIG = os.path.join(os.path.dirname(__file__), "data", "hf_reference",
                           "llada_v_language_tower", "tokenizer_config.json")
with open(REAL_CONFIG) as _f:
    CHAT_TEMPLATE = json.load(_f)["chat_template"]

# The character tokenizer by its definition: these special tokens at ids 0..8, then
# string.printable in order from id 9.
CHAR_SPECIALS = {"<|pad|>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<|mdm_mask|>": 3,
                 "<|start_header_id|>": 4, "<|end_header_id|>": 5, "<|eot_id|>": 6}
BOS, EOS, START, END, EOT = 1, 2, 4, 5, 6
NL = 9 + string.printable.index("\n")   # 105


def char_ids(text: str) -> list[int]:
    """Ids of text holding special-token strings, by the character tokenizer's definition."""
    ids = []
    for piece in re.split("(" + "|".join(map(re.escape, CHAR_SPECIALS)) + ")", text):
        if piece in CHAR_SPECIALS:
            ids.append(CHAR_SPECIALS[piece])
        else:
            ids += [9 + string.printable.index(ch) for ch in piece]
    return ids


def official_prompt_text(messages: list[dict]) -> str:
    """The released chat template (it always ends with the assistant header), as transformers
    renders it."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token="<|startoftext|>",
                                                 add_generation_prompt=True)


def official_batch(examples: list[tuple[list[int], list[int]]], eos: int):
    """The official SFT mini-batch of (prompt ids, answer ids + <|eot_id|>) examples:
    input_ids EOS-padded to the longest example, prompt_lengths, answer_lengths."""
    longest = max(len(p) + len(a) for p, a in examples)
    input_ids = np.array([p + a + [eos] * (longest - len(p) - len(a)) for p, a in examples])
    prompt_lengths = np.array([len(p) for p, _ in examples])
    return input_ids, prompt_lengths, longest - prompt_lengths


def _sft_config(source, *, seq_len=64, batch_size=4, multiturn="sample_turn", shuffle=True,
                seed=0, epochs=0, objective="sft"):
    c = default_config()
    c.train.objective = objective
    c.data.source = source
    c.data.sft_multiturn = multiturn
    c.data.shuffle = shuffle
    c.data.num_epochs = epochs
    c.train.seq_len = seq_len
    c.train.batch_size = batch_size
    c.train.seed = seed
    return c


class _PickLast:
    """Stands in for the rng: sample_turn picks the last assistant turn."""

    def integers(self, n):
        return n - 1


def test_single_turn_row_written_by_hand():
    row = build_sft_example([{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Yo"}], TOK, seq_len=32)
    u, s, e, r, a, i, t, n = 39, 37, 23, 36, 19, 27, 38, 32   # 9 + string.printable.index(c)
    expected = [BOS,
                START, u, s, e, r, END, NL, NL, 52, i, EOT,                        # user: Hi
                START, a, s, s, i, s, t, a, n, t, END, NL, NL,                     # assistant
                69, 33, EOT,                                                       # Yo
                EOS, EOS, EOS, EOS]                                                # padding
    assert len(expected) == 32
    np.testing.assert_array_equal(row["tokens"], expected)
    assert row["tokens"].dtype == np.int32
    assert row["maskable"].dtype == bool and row["fill"].dtype == bool
    # Trained: the answer, its <|eot_id|> and the EOS padding (official answer_len: 7 here).
    np.testing.assert_array_equal(row["maskable"], [False] * 25 + [True] * 7)
    # Fill: the EOS padding after the example's own last token (its <|eot_id|>).
    np.testing.assert_array_equal(row["fill"], [False] * 28 + [True] * 4)
    # The same prompt from the released template, rendered by jinja.
    assert char_ids(official_prompt_text([{"role": "user", "content": "Hi"}])) == expected[:25]


def test_row_with_the_real_special_ids(tmp_path):
    """A word-level vocabulary holding the released special tokens at their real ids."""
    with open(REAL_CONFIG) as f:
        config = json.load(f)
    added = {token["content"]: int(i) for i, token in config["added_tokens_decoder"].items()}
    vocab = {"[UNK]": 0, "user": 1, "assistant": 2, "\n\n": 3, "Hi": 4, "Yo": 5, "system": 6,
             "Brief.": 7, **added}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("\n\n"), behavior="isolated")
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    raw.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(REAL_CONFIG, tmp_path / "tokenizer_config.json")
    tok = load_tokenizer(f"hf:{tmp_path}")
    messages = [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}]
    row = build_sft_example(messages, tok, seq_len=24)
    expected = [126080,                                          # <|startoftext|>
                126346, 6, 126347, 3, 7, 126348,                 # system turn
                126346, 1, 126347, 3, 4, 126348,                 # user turn
                126346, 2, 126347, 3,                            # assistant header + \n\n
                5, 126348,                                       # Yo<|eot_id|>
                126081, 126081, 126081, 126081, 126081]          # <|endoftext|> padding
    np.testing.assert_array_equal(row["tokens"], expected)
    np.testing.assert_array_equal(row["maskable"], [False] * 17 + [True] * 7)
    np.testing.assert_array_equal(row["fill"], [False] * 19 + [True] * 5)
    prompt = raw.encode(official_prompt_text(messages[:2]), add_special_tokens=False).ids
    assert prompt == expected[:17]


def test_masked_response_never_labels_the_fill():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    row = build_sft_example(messages, TOK, seq_len=32, fill_maskable=False)
    np.testing.assert_array_equal(row["maskable"], [False] * 25 + [True] * 3 + [False] * 4)
    np.testing.assert_array_equal(row["fill"], [False] * 28 + [True] * 4)


def test_a_row_that_fits_exactly_has_no_fill():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    row = build_sft_example(messages, TOK, seq_len=28)
    assert not row["fill"].any() and row["tokens"][-1] == EOT


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


SINGLE_TURN = [("Hi", "Yo"), ("What is two plus two?", "four"), ("x", "a longer answer here"),
               ("Name a colour", "red")]


@pytest.mark.parametrize("objective", ["sft", "masked_response"])
def test_batch_trimmed_by_fill_is_the_official_batch(tmp_path, objective):
    """Rows cut where fill says (the longest row of the batch) are the official mini-batch:
    same ids, same prompt lengths, and for 'sft' the same answer lengths (EOS padding up to the
    longest example included); 'masked_response' labels the answers and never the padding."""
    _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]}
                                         for q, a in SINGLE_TURN])
    c = _sft_config(f"files:{tmp_path / 'c.jsonl'}", seq_len=80, batch_size=4, shuffle=False,
                    epochs=1, objective=objective)
    (batch,) = list(pipeline.build_dataset(c, TOK, process_index=0, process_count=1))
    assert batch["fill"].shape == batch["tokens"].shape == (4, 80)
    examples = [(char_ids(official_prompt_text([{"role": "user", "content": q}])),
                 char_ids(a + "<|eot_id|>")) for q, a in SINGLE_TURN]
    input_ids, prompt_lengths, answer_lengths = official_batch(examples, EOS)
    longest = int(np.max(80 - batch["fill"].sum(axis=1)))
    assert longest == input_ids.shape[1]
    np.testing.assert_array_equal(batch["tokens"][:, :longest], input_ids)
    np.testing.assert_array_equal(batch["tokens"][:, longest:], EOS)
    # fill is a suffix of every row
    for fill in batch["fill"]:
        assert not fill[:int(np.argmax(fill))].any() and fill[int(np.argmax(fill)):].all()
    maskable = batch["maskable"][:, :longest]
    first_maskable = np.argmax(maskable, axis=1)
    np.testing.assert_array_equal(first_maskable, prompt_lengths)
    if objective == "sft":
        np.testing.assert_array_equal(maskable.sum(axis=1), answer_lengths)
        assert batch["maskable"][:, longest:].all()
    else:
        own_answer = np.array([len(a) for _, a in examples])
        np.testing.assert_array_equal(maskable.sum(axis=1), own_answer)
        assert not (batch["maskable"] & batch["fill"]).any()


def _conversations(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        messages = [{"role": "system", "content": f"sys {k}"}] if k % 3 == 0 else []
        for turn in range(1 + k % 3):
            question = f"q{k}.{turn} " + "x" * int(rng.integers(4))
            answer = f"a{k}.{turn}" + "y" * int(rng.integers(4))
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        out.append(messages)
    return out


def _match_sample_turn_row(tokens, maskable, fill, conversations):
    """(conversation, turn) whose official rendering equals the row, else None."""
    first = int(np.argmax(maskable))
    for k, messages in enumerate(conversations):
        for t, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = char_ids(official_prompt_text(messages[:t]))
            answer = char_ids(m["content"] + "<|eot_id|>")
            padding = len(tokens) - len(prompt) - len(answer)
            if padding >= 0 and first == len(prompt) and list(tokens) == (
                    prompt + answer + [EOS] * padding):
                assert fill.sum() == padding and fill[len(tokens) - padding:].all()
                return k, t
    return None


def test_sample_turn_prompt_is_never_maskable_nor_masked(tmp_path):
    conversations = _conversations(12, seed=0)
    _write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in conversations])
    picked = set()
    for seed in range(6):
        c = _sft_config(f"files:{tmp_path / 'c.jsonl'}", seed=seed, seq_len=160)  # no cuts
        iterator = iter(pipeline.build_dataset(c, TOK, process_index=0, process_count=1))
        for step in range(6):
            batch = next(iterator)
            for tokens, maskable, fill in zip(batch["tokens"], batch["maskable"], batch["fill"],
                                              strict=True):
                match = _match_sample_turn_row(tokens, maskable, fill, conversations)
                assert match is not None, TOK.decode(tokens, skip_special=False)
                picked.add(match)
                first = int(np.argmax(maskable))
                assert not maskable[:first].any() and maskable[first:].all()
            # With the trainer's forward process, prompt tokens are never replaced by the mask.
            for draw in range(3):
                noised = forward_process(jax.random.key(100 * seed + 10 * step + draw),
                                         batch["tokens"], TOK.mask_id, 1e-3, batch["maskable"])
                noisy = np.asarray(noised.noisy_tokens)
                np.testing.assert_array_equal(noisy[~batch["maskable"]],
                                              batch["tokens"][~batch["maskable"]])
                assert not np.asarray(noised.noised)[~batch["maskable"]].any()
    # Every turn of a three-turn conversation gets its chance as the target.
    assert {t for k, t in picked if k == 2} == {1, 3, 5}


def test_all_responses_trains_every_answer():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "B?"}, {"role": "assistant", "content": "bb"},
                {"role": "user", "content": "trailing question"}]
    row = build_sft_example(messages, TOK, seq_len=96, multiturn="all_responses")
    pieces = [("<|startoftext|>", False),
              ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", False),
              ("<|start_header_id|>user<|end_header_id|>\n\nA?<|eot_id|>", False),
              ("<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("a<|eot_id|>", True),
              ("<|start_header_id|>user<|end_header_id|>\n\nB?<|eot_id|>", False),
              ("<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("bb<|eot_id|>", True)]
    tokens = [i for text, _ in pieces for i in char_ids(text)]
    mask = [trained for text, trained in pieces for _ in char_ids(text)]
    padding = 96 - len(tokens)
    np.testing.assert_array_equal(row["tokens"], tokens + [EOS] * padding)
    np.testing.assert_array_equal(row["maskable"], mask + [True] * padding)
    np.testing.assert_array_equal(row["fill"], [False] * len(tokens) + [True] * padding)
    # Answer length: "a" + eot, "bb" + eot, and the padding.
    assert row["maskable"].sum() == 2 + 3 + padding


def _exchange(i):
    return [{"role": "user", "content": f"question {i} " + "q" * 10},
            {"role": "assistant", "content": f"answer {i} " + "r" * 10}]


def _turn_length(message):
    """Tokens of one rendered turn: header (1 + role + 1 + 2 newlines), content, <|eot_id|>."""
    return 1 + len(message["role"]) + 1 + 2 + len(message["content"].strip()) + 1


def test_truncation_drops_oldest_exchanges_and_keeps_the_answer():
    system = {"role": "system", "content": "sys"}
    messages = [system] + [m for i in range(5) for m in _exchange(i)]
    # Room for BOS, the system turn and exactly the last two exchanges (+ 3 tokens to spare).
    seq_len = 1 + sum(_turn_length(messages[i]) for i in (0, 7, 8, 9, 10)) + 3
    row = build_sft_example(messages, TOK, seq_len=seq_len, rng=_PickLast())
    expected_prompt = char_ids(official_prompt_text([system, *messages[7:10]]))
    answer = char_ids(messages[10]["content"] + "<|eot_id|>")
    np.testing.assert_array_equal(row["tokens"], expected_prompt + answer + [EOS] * 3)
    assert row["maskable"].sum() == len(answer) + 3 and row["fill"].sum() == 3
    assert not row["maskable"][:len(expected_prompt)].any()


def test_truncation_cuts_a_long_prompt_from_the_left_keeping_bos():
    messages = [{"role": "user", "content": "long " * 30 + "end?"},
                {"role": "assistant", "content": "short answer"}]
    seq_len = 48
    row = build_sft_example(messages, TOK, seq_len=seq_len)
    full_prompt = char_ids(official_prompt_text(messages[:1]))
    answer = char_ids("short answer<|eot_id|>")
    kept = seq_len - 1 - len(answer)
    np.testing.assert_array_equal(row["tokens"], [BOS, *full_prompt[-kept:], *answer])
    assert full_prompt[-kept:][-18:] == char_ids(
        "end?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    np.testing.assert_array_equal(row["maskable"], [False] * (1 + kept) + [True] * len(answer))
    assert not row["fill"].any()


def test_an_answer_that_cannot_fit_is_a_bad_record_never_cut():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z" * 40}]
    with pytest.raises(BadRecordError, match="conv.jsonl:7: conversation too long.*seq_len is 48"):
        build_sft_example(messages, TOK, seq_len=48, origin="conv.jsonl:7")


def test_bad_records_error_names_the_line_or_are_skipped_and_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lines = [good,
             '{"messages": [{"role": "user", "content": "hi"}',                     # 2: JSON
             {"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]},
             {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "   "}]},                # 4: empty
             {"messages": [{"role": "user", "content": "only a question"}]},         # 5
             {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "w" * 80}]},             # 6: long
             {"messages": [{"role": "user", "content": "q"},
                           {"role": "system", "content": "late"},
                           {"role": "assistant", "content": "a"}]},                 # 7
             {"messages": [{"role": "bot", "content": "q"}]},                        # 8
             {"text": "not a conversation"},                                         # 9
             good]
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, lines)
    c = _sft_config(f"files:{path}", seq_len=48, batch_size=1, shuffle=False, epochs=1)
    with pytest.raises(BadRecordError, match=f"{path}:2: malformed JSON"):
        list(pipeline.build_dataset(c, TOK, process_index=0, process_count=1))
    expectations = {3: "message 0 has no 'role'", 4: r"message 1 \(assistant\) is empty",
                    5: "no assistant turn", 6: "conversation too long",
                    7: "only the first message", 8: "role 'bot'", 9: "non-empty list in field"}
    for line, message in expectations.items():
        record = json.loads(path.read_text().splitlines()[line - 1])
        record["_origin"] = f"{path}:{line}"
        with pytest.raises(BadRecordError, match=f"{path}:{line}: .*{message}"):
            build_sft_example(parse_messages(record), TOK, seq_len=48, origin=record["_origin"])
    c.data.bad_records = "skip"
    bad_records._SKIPPED.clear()
    rows = list(pipeline.build_dataset(c, TOK, process_index=0, process_count=1))
    assert len(rows) == 2  # the two good conversations, nothing else
    for batch in rows:
        assert TOK.decode(batch["tokens"][0][batch["maskable"][0]], skip_special=False) == (
            "yo<|eot_id|>" + "<|endoftext|>" * (48 - 25 - 3))
    assert dict(bad_records._SKIPPED) == {"unreadable": 1, "invalid": 5, "empty": 1,
                                       "overlong": 1}


def test_synthetic_chat_set():
    train = synthetic_chat.SyntheticChatSource("train", 2000)
    test = synthetic_chat.SyntheticChatSource("test", 2000)
    assert len(train) == 2000 and len(test) == 200
    plain_questions, openers = {}, collections.Counter()
    for source in (train, test):
        for i in range(len(source)):
            record = source[i]
            user, assistant = record["messages"]
            q, a = user["content"], assistant["content"]
            match = re.fullmatch(r"(|Hi! |Now: |Task: |Please: )"
                                 r"(Repeat|Uppercase|Reverse|First letter of|Last letter of) "
                                 r"([a-z]{3})", q)
            assert match, q
            opener, verb, word = match.groups()
            rule = {"Repeat": word, "Uppercase": word.upper(), "Reverse": word[::-1],
                    "First letter of": word[0], "Last letter of": word[-1]}[verb]
            assert a == rule
            assert all(0 <= t < TOK.vocab_size and t != TOK.unk_id for t in TOK.encode(q + a))
            plain_questions.setdefault(source.split, set()).add(f"{verb} {word}")
            openers[opener] += 1
    # Held-out (task, word) pairs are unseen in training, whatever the opener.
    assert not plain_questions["train"] & plain_questions["test"]
    assert train[17] == synthetic_chat.SyntheticChatSource("train", 2000)[17]  # deterministic
    assert len(plain_questions["train"]) > 1000  # not a handful of repeated questions
    # About half of the questions have no opener; each opener is used.
    assert 0.4 < openers[""] / 2200 < 0.6 and len(openers) == 5


def _held_out_accuracy(params, model, config, count=100):
    """Exact answers (text before <|eot_id|>) of the sampler on held-out questions."""
    from llada_jax.diffusion import sampler

    items = [synthetic_chat.question_answer("test", i) for i in range(count)]
    prompts = [TOK.render_chat([{"role": "user", "content": q}]) for q, _ in items]
    prompt_tokens, prompt_mask = sampler.pad_prompts(prompts, TOK.pad_id)
    settings = sampler.SamplerConfig.from_config(config, eot_id=TOK.eot_id)
    out = np.asarray(sampler.generate(params, model, prompt_tokens, prompt_mask, settings,
                                      jax.random.key(0)))
    correct = 0
    generations = out[:, prompt_tokens.shape[1]:].tolist()
    for (_, answer), generated in zip(items, generations, strict=True):
        end = generated.index(TOK.eot_id) if TOK.eot_id in generated else len(generated)
        ids = generated[:end]  # an untrained model may emit ids beyond the tokenizer's 109
        correct += all(i < TOK.vocab_size for i in ids) and TOK.decode(ids) == answer
    return correct / count


def test_tiny_sft_end_to_end_answers_held_out_questions(tmp_path):
    """configs/sft_tiny.py through launch/train.py, then the sampler on held-out questions."""
    import os
    import subprocess
    import sys

    import flax.linen as nn
    import jax.numpy as jnp

    from configs.sft_tiny import get_config
    from llada_jax.train import checkpoint as checkpoint_lib
    from llada_jax.train import state as state_lib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # XLA's default optimisation: the flags the recipe's accuracy was measured with.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=repo, JAX_DISABLE_MOST_OPTIMIZATIONS="0")
    result = subprocess.run(
        [sys.executable, os.path.join(repo, "launch", "train.py"),
         "--config=" + os.path.join(repo, "configs", "sft_tiny.py"),
         f"--workdir={tmp_path}", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=0"],
        capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    config = get_config()
    model = state_lib.make_model(config)
    _, trained = checkpoint_lib.load_params(str(tmp_path))
    untrained = nn.meta.unbox(jax.jit(model.init)(jax.random.key(config.train.seed),
                                                  jnp.zeros((1, 8), jnp.int32)))["params"]
    before = _held_out_accuracy(untrained, model, config)
    after = _held_out_accuracy(trained, model, config)
    # Measured (200 questions; 1000 steps of 64, init_std 0.1): 0.0 before; after 0.93-1.0 on
    # seeds 0, 1, 2 with the default XLA flags and with the CPU instruction set capped at AVX
    # (the table in configs/sft_tiny.py; the old recipe's worst run was 0.395). The bar sits well
    # below the worst run so a different trajectory on another machine still passes, and far
    # above what an undertrained model reaches (one-letter answers only: about 0.3).
    assert before <= 0.05
    assert after >= 0.6, (before, after)
