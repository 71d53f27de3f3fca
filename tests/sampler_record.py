"""Before/after REGRESSION RECORD of the sampler's token outputs (not a correctness reference).

    python tests/sampler_record.py --write   # store today's outputs in tests/data/sampler_record.json
    python tests/sampler_record.py           # compare the current sampler with the stored record

The record holds the tokens that the sampler produced, on small random models, for every mode
(vanilla with 1/2/4 blocks, CFG, random remasking, temperature, prefix / dual caches, refresh,
threshold / factor decoding, early exit, left-padded batches, EOS/EoT rules, stop on EoT and an
image-conditioned LLaDA-V case) at the time it was written. It says only "these modes did not
change" (or which did) across a refactoring; whether the outputs are RIGHT is what the NumPy
reference in tests/test_sampler.py checks. The comparison prints one line per mode and exits 1 if
a mode changed that is not listed as an intended change on the command line (--expect=a,b).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax.diffusion.sampler import build_canvas, generate, pad_prompts, sample
from tests.test_sampler import EOS, EOT, PAD, sampler_config, tiny

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sampler_record.json")
PROMPT = np.random.default_rng(21).integers(7, 48, size=(2, 5))

# Modes run through `generate` on the 2-layer tiny model (prompt PROMPT, gen 16).
GENERATE_MODES = {
    "vanilla_1_block": dict(block_length=16, steps=16),
    "vanilla_2_blocks": dict(block_length=8, steps=8),
    "vanilla_4_blocks": dict(block_length=4, steps=8),
    "cfg": dict(block_length=8, steps=8, cfg_scale=1.5),
    "random_remasking_t0": dict(block_length=8, steps=8, remasking="random"),
    "random_remasking_t1": dict(block_length=8, steps=8, remasking="random", temperature=1.0),
    "temperature_1": dict(block_length=8, steps=8, temperature=1.0),
    "logits_eos_inf": dict(block_length=8, steps=8, logits_eos_inf=True),
    "confidence_eos_eot_inf": dict(block_length=8, steps=8, confidence_eos_eot_inf=True),
    "prefix": dict(block_length=8, steps=16, cache="prefix"),
    "dual": dict(block_length=8, steps=16, cache="dual"),
    "prefix_refresh_2": dict(block_length=8, steps=16, cache="prefix", refresh_every=2),
    "dual_refresh_2_cfg": dict(block_length=8, steps=16, cache="dual", refresh_every=2,
                               cfg_scale=1.0),
    "threshold_0.3": dict(block_length=8, threshold=0.3),
    "factor_3": dict(block_length=8, factor=3.0),
    "dual_threshold_0.2": dict(block_length=8, cache="dual", threshold=0.2),
    "prefix_factor_2": dict(block_length=4, cache="prefix", factor=2.0),
    "early_exit": dict(block_length=8, steps=16, early_exit=True),
}


def eos_biased_sample(config, key: int, bias_id: int = EOS):
    """The tiny model with +6 on one logit (EOS or EoT) from the 7th generated position on, so
    rows finish inside the generation: exercises early exit, the EOS/EoT rules and stop on EoT."""
    model, params = tiny()
    tokens, mask, positions = build_canvas(PROMPT, np.ones_like(PROMPT, bool), 16, 3)
    onehot = jnp.zeros(48).at[bias_id].set(1.0)

    def forward(x, **kw):
        out = model.apply({"params": params}, x, **kw)
        bias = 6.0 * (kw["positions"] >= 5 + 6)[..., None] * onehot
        return (out[0] + bias, out[1]) if kw.get("return_kv") else out + bias

    run = jax.jit(lambda k: sample(forward, tokens, mask, positions, 5, config, k).tokens)
    return run(jax.random.key(key))


def llada_v_case():
    """A tiny LLaDA-V (configs/llada_v_tiny.py, random weights) sampling after one image."""
    import flax.linen as nn

    from llada_jax.data import multimodal_data as md
    from llada_jax.data.schema import IMAGE_FIELDS
    from llada_jax.data.tokenizer import CharTokenizer
    from tests import llada_v_prompts
    from tests.test_llada_v import _tiny_config, _tiny_model

    c = _tiny_config()
    model = _tiny_model(c)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 2), jnp.int32)))[
        "params"]
    picture = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tok = CharTokenizer()
    conversation = md.encode_conversation([{"role": "user", "content": "<image>\nShape?"}],
                                          [picture], tok, md.ImageProcessor.from_config(c),
                                          add_generation_prompt=True)
    batch = llada_v_prompts.prompt_batch([conversation], 8, tok.pad_id, tok.mask_id, 1, 32, 16)
    config = sampler_config(gen_length=8, block_length=4, steps=8, mask_id=tok.mask_id,
                            eos_id=2, eot_id=tok.eot_id, banned_ids=(2, 1, 4, 5),
                            stop_at_eot=True, vocab_limit=tok.vocab_size)
    return generate(params, model, batch["tokens"], batch["mask"], config, jax.random.key(0),
                    images=[batch[k] for k in IMAGE_FIELDS])


def outputs() -> dict[str, list]:
    model, params = tiny()
    mask = np.ones_like(PROMPT, bool)
    result = {}
    for name, fields in GENERATE_MODES.items():
        out = generate(params, model, PROMPT, mask, sampler_config(**fields), jax.random.key(5))
        result[name] = np.asarray(out).tolist()
    rng = np.random.default_rng(8)
    prompts = [list(rng.integers(7, 48, size=n)) for n in (3, 7)]
    tokens, pad_mask = pad_prompts(prompts, PAD)
    for name, fields in {"padded_batch_cfg": dict(block_length=8, steps=8, cfg_scale=1.0),
                         "padded_batch_dual_threshold": dict(block_length=8, cache="dual",
                                                             threshold=0.2)}.items():
        out = generate(params, model, tokens, pad_mask, sampler_config(**fields),
                       jax.random.key(0))
        result[name] = np.asarray(out).tolist()
    biased = {
        "eos_bias_vanilla_4_blocks": (dict(block_length=4, steps=16), EOS),
        "eos_bias_early_exit": (dict(block_length=4, steps=16, early_exit=True), EOS),
        "eos_bias_dual_threshold_early_exit": (dict(block_length=4, cache="dual",
                                                    threshold=0.3, early_exit=True), EOS),
        "eos_bias_confidence_eos_eot_inf": (dict(block_length=16, steps=16,
                                                 confidence_eos_eot_inf=True), EOS),
        "eot_bias_confidence_eos_eot_inf": (dict(block_length=8, steps=16,
                                                 confidence_eos_eot_inf=True), EOT),
        "eot_bias_stop_at_eot": (dict(block_length=8, steps=16, stop_at_eot=True,
                                      banned_ids=(EOS,)), EOT),
        "eot_bias_stop_at_eot_early_exit": (dict(block_length=8, steps=16, stop_at_eot=True,
                                                 early_exit=True, banned_ids=(EOS,)), EOT),
    }
    for name, (fields, bias_id) in biased.items():
        result[name] = np.asarray(eos_biased_sample(sampler_config(**fields), 4,
                                                    bias_id)).tolist()
    result["llada_v_image"] = np.asarray(llada_v_case()).tolist()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the current outputs")
    parser.add_argument("--expect", default="", help="comma-separated modes meant to change")
    args = parser.parse_args()
    current = outputs()
    if args.write:
        with open(RECORD, "w") as f:
            json.dump({"note": "before/after regression record of sampler outputs, NOT a "
                               "correctness reference (see tests/sampler_record.py)",
                       "outputs": current}, f, indent=None)
            f.write("\n")
        print(f"wrote {len(current)} modes to {RECORD}")
        return 0
    with open(RECORD) as f:
        stored = json.load(f)["outputs"]
    expected_changes = set(filter(None, args.expect.split(",")))
    bad = 0
    for name, tokens in current.items():
        same = stored.get(name) == tokens
        status = "same" if same else ("changed (intended)" if name in expected_changes
                                      else "CHANGED")
        bad += status == "CHANGED"
        print(f"{name:40s} {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
