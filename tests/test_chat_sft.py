"""SFT rows: what is maskable, EOS padding, multi-turn modes, truncation, bad records, chat set."""

import json
import string

import jax
import numpy as np
import pytest

from llada_jax.config import default_config
from llada_jax.data import pipeline, synthetic_chat
from llada_jax.data.chat import BadRecordError, build_sft_example, parse_messages
from llada_jax.data.tokenizer import CharTokenizer
from llada_jax.diffusion.noise import forward_process

TOK = CharTokenizer()


def _chars(text):
    """CharTokenizer ids by its definition: 9 special tokens, then string.printable in order."""
    return [9 + string.printable.index(ch) for ch in text]


def _sft_config(source, *, seq_len=64, batch_size=4, multiturn="sample_turn", shuffle=True,
                seed=0, epochs=0):
    c = default_config()
    c.train.objective = "sft"
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


def test_single_turn_row_by_hand():
    row = build_sft_example([{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Yo"}], TOK, seq_len=32)
    bos, eos, start, end, eot = 1, 2, 4, 5, 6
    prompt = ([bos, start, *_chars("user"), end, *_chars("\n\nHi"), eot,
               start, *_chars("assistant"), end, *_chars("\n\n")])
    assert len(prompt) == 25  # 1 + 8 + 2 + 1 + 13
    expected = prompt + _chars("Yo") + [eot] + [eos] * 4
    np.testing.assert_array_equal(row["tokens"], expected)
    assert row["tokens"].dtype == np.int32 and row["maskable"].dtype == bool
    # The answer, its <|eot_id|> and the 4 EOS of padding are trained: answer length 7.
    np.testing.assert_array_equal(row["maskable"], [False] * 25 + [True] * 7)


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


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _match_sample_turn_row(tokens, maskable, conversations):
    """(conversation, turn) whose reference rendering equals the row, else None."""
    first = int(np.argmax(maskable))
    for k, messages in enumerate(conversations):
        for t, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = TOK.render_chat(messages[:t], add_generation_prompt=True)
            answer = [*TOK.encode(m["content"]), TOK.eot_id]
            padding = len(tokens) - len(prompt) - len(answer)
            if padding >= 0 and first == len(prompt) and list(tokens) == (
                    prompt + answer + [TOK.eos_id] * padding):
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
            for tokens, maskable in zip(batch["tokens"], batch["maskable"], strict=True):
                match = _match_sample_turn_row(tokens, maskable, conversations)
                assert match is not None, TOK.decode(tokens, skip_special=False)
                picked.add(match)
                first = int(np.argmax(maskable))
                assert not maskable[:first].any() and maskable[first:].all()
            # With the trainer's forward process, prompt tokens are never replaced by the mask.
            for draw in range(5):
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
    tokens, mask = [TOK.bos_id], [False]
    for m in messages[:5]:
        turn = TOK.render_turn(m["role"], m["content"])
        header = len(TOK.header(m["role"]))
        tokens += turn
        trained = m["role"] == "assistant"
        mask += [False] * header + [trained] * (len(turn) - header)
    padding = 96 - len(tokens)
    np.testing.assert_array_equal(row["tokens"], tokens + [TOK.eos_id] * padding)
    np.testing.assert_array_equal(row["maskable"], mask + [True] * padding)
    # Answer length: "a" + eot, "bb" + eot, and the padding.
    assert row["maskable"].sum() == 2 + 3 + padding


def _exchange(i):
    return [{"role": "user", "content": f"question {i} " + "q" * 10},
            {"role": "assistant", "content": f"answer {i} " + "r" * 10}]


def test_truncation_drops_oldest_exchanges_and_keeps_the_answer():
    system = {"role": "system", "content": "sys"}
    messages = [system] + [m for i in range(5) for m in _exchange(i)]
    turn_length = {i: len(TOK.render_turn(m["role"], m["content"]))
                   for i, m in enumerate(messages)}
    # Room for BOS, the system turn and exactly the last two exchanges (+ 3 tokens to spare).
    seq_len = 1 + turn_length[0] + sum(turn_length[i] for i in range(7, 11)) + 3
    row = build_sft_example(messages, TOK, seq_len=seq_len, rng=_PickLast())
    expected_prompt = TOK.render_chat([system, *messages[7:10]], add_generation_prompt=True)
    answer = [*TOK.encode(messages[10]["content"]), TOK.eot_id]
    np.testing.assert_array_equal(row["tokens"], expected_prompt + answer + [TOK.eos_id] * 3)
    assert row["maskable"].sum() == len(answer) + 3
    assert not row["maskable"][:len(expected_prompt)].any()


def test_truncation_cuts_a_long_prompt_from_the_left_keeping_bos():
    messages = [{"role": "user", "content": "long " * 30 + "end?"},
                {"role": "assistant", "content": "short answer"}]
    seq_len = 48
    row = build_sft_example(messages, TOK, seq_len=seq_len)
    full_prompt = TOK.render_chat(messages[:1], add_generation_prompt=True)
    answer = [*TOK.encode("short answer"), TOK.eot_id]
    kept = seq_len - 1 - len(answer)
    np.testing.assert_array_equal(row["tokens"], [TOK.bos_id, *full_prompt[-kept:], *answer])
    assert TOK.decode(row["tokens"][1:1 + kept], skip_special=False).endswith(
        "end?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    np.testing.assert_array_equal(row["maskable"], [False] * (1 + kept) + [True] * len(answer))


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
    pipeline.reset_skipped_records()
    rows = list(pipeline.build_dataset(c, TOK, process_index=0, process_count=1))
    assert len(rows) == 2  # the two good conversations, nothing else
    for batch in rows:
        assert TOK.decode(batch["tokens"][0][batch["maskable"][0]], skip_special=False) == (
            "yo<|eot_id|>" + "<|endoftext|>" * (48 - 25 - 3))
    assert pipeline.skipped_records() == {"unreadable": 1, "invalid": 5, "empty": 1,
                                          "overlong": 1}


def test_synthetic_chat_set():
    train = synthetic_chat.SyntheticChatSource("train", 2000)
    test = synthetic_chat.SyntheticChatSource("test", 2000)
    assert len(train) == 2000 and len(test) == 200
    questions = {}
    for source in (train, test):
        for i in range(len(source)):
            record = source[i]
            user, assistant = record["messages"]
            q, a = user["content"], assistant["content"]
            verb, word = q.rsplit(" ", 1)
            rule = {"Repeat": word, "Uppercase": word.upper(), "Reverse": word[::-1],
                    "First letter of": word[0], "Last letter of": word[-1]}[verb]
            assert a == rule and word.isalpha() and word.islower() and len(word) == 3
            assert all(0 <= t < TOK.vocab_size and t != TOK.unk_id for t in TOK.encode(q + a))
            questions.setdefault(source.split, set()).add(q)
    assert not questions["train"] & questions["test"]  # held-out questions are unseen
    assert train[17] == synthetic_chat.SyntheticChatSource("train", 2000)[17]  # deterministic
    assert len(questions["train"]) > 1000  # not a handful of repeated questions


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
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    result = subprocess.run(
        [sys.executable, os.path.join(repo, "launch", "train.py"),
         "--config=" + os.path.join(repo, "configs", "sft_tiny.py"),
         f"--workdir={tmp_path}", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=0"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    config = get_config()
    model = state_lib.make_model(config)
    _, trained = checkpoint_lib.load_params(str(tmp_path))
    untrained = nn.meta.unbox(jax.jit(model.init)(jax.random.key(config.train.seed),
                                                  jnp.zeros((1, 8), jnp.int32)))["params"]
    before = _held_out_accuracy(untrained, model, config)
    after = _held_out_accuracy(trained, model, config)
    # Measured: 0.00 before, 0.78 after (4000 steps of 16 conversations).
    assert before <= 0.05
    assert after >= 0.5 and after >= before + 0.45, (before, after)
