"""The restructure of data/, config, interop and generation changed no number (issue 13).

tests/data/restructure_record.json was written by `python tests/restructure_record.py --write`
from the code BEFORE the restructure: the losses of the first updates of tiny pre-training, SFT
and LLaDA-V runs, and the CRC32 of every tensor of float32 Hugging Face exports of those params
and of their re-import. This test recomputes them through the same stable entry points and
requires them BIT-IDENTICAL (exact float equality, exact CRCs). The values are computed in fresh
processes with fixed XLA flags, but XLA's CPU float results depend on the instruction set, so the
record is only comparable on the machine type it was written on (the project's 2-core AVX2 CPU
box); on another machine type, rewrite it from the pre-restructure commit first.

The record says "nothing changed", not "this is right": correctness is what the tests against
the NumPy / PyTorch references prove. An intended numerical change is made by rewriting the
record in the same commit, saying why. The sampler has its own record (tests/sampler_record.py).
"""

import json
import math

from tests import restructure_record


def _differences(recorded: dict, found: dict) -> list[str]:
    lines = [f"{key}: missing now" for key in recorded.keys() - found.keys()]
    lines += [f"{key}: new (not in the record)" for key in found.keys() - recorded.keys()]
    for key in sorted(recorded.keys() & found.keys()):
        old, new = recorded[key], found[key]
        if old == new:
            continue
        if isinstance(old, list):
            steps = [i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b]
            lines.append(f"{key}: steps {steps} differ, recorded {old}, found {new}")
        else:
            tensors = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
            lines.append(f"{key}: tensors {tensors[:8]} (of {len(tensors)}) differ")
    return lines


def test_losses_and_conversions_are_bit_identical_to_the_record():
    with open(restructure_record.RECORD) as f:
        recorded = json.load(f)
    found = restructure_record.compute_all()
    # Sanity of the record itself: round trip exact, losses finite and first near ln(vocab).
    for kind in ("pretrain", "llada_v"):
        assert recorded[f"export_{kind}"] == recorded[f"reexport_{kind}"], kind
    for kind in ("pretrain", "sft", "llada_v"):
        assert all(math.isfinite(x) for x in recorded[kind]), kind
    # init_std 0.02: nearly uniform predictions over the 128 characters at the first update.
    assert abs(recorded["pretrain"][0] - math.log(128)) < 0.5
    differences = _differences(recorded, found)
    assert not differences, "\n".join(differences)
