"""MFU bookkeeping: FLOP formula on hand-worked configs, peak lookup by device kind."""

from llada_jax.config import ModelConfig
from llada_jax.flops import peak_flops_per_device, train_flops_per_step


def test_train_flops_of_llada_8b_by_hand():
    # Matmul params: 8,015,581,184 - 126,464 * 4,096 (embedding lookup) = 7,497,584,640.
    # 6 * 7,497,584,640 * (8 * 4096) + 12 * 32 * 4096^2 * (32 * 128) * 8
    #   = 1,474,085,120,901,120 + 211,106,232,532,992 = 1,685,191,353,434,112.
    flops = train_flops_per_step(ModelConfig(), batch_size=8, seq_len=4096)
    assert flops == 1_685_191_353_434_112


def test_peak_lookup_prefers_the_longest_prefix_and_the_override():
    assert peak_flops_per_device("TPU v5 lite") == 197e12  # not the 459 of "TPU v5"
    assert peak_flops_per_device("TPU v5p chip") == 459e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", override_tflops=2.0) == 2e12
