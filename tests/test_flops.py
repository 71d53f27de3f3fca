"""MFU bookkeeping: FLOP formulas on hand-worked configs, peak lookup by device kind."""

from llada_jax.config import ModelConfig
from llada_jax.flops import (
    active_block_weights,
    block_weights,
    forward_flops,
    peak_bandwidth_per_device,
    peak_flops_per_device,
    roofline_seconds,
    train_flops_per_step,
)


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


def test_forward_flops_of_a_llada_8b_sampler_step_by_hand():
    # One block: q, k, v, out 4 x 4096 x 4096 = 67,108,864; SwiGLU 3 x 4096 x 12,288 =
    # 150,994,944; together 218,103,808 (x 32 = 6,979,321,856 = 8,015,581,184 params minus the
    # embedding and LM head 2 x 126,464 x 4096 and the norm scales 65 x 4096).
    config = ModelConfig()
    assert block_weights(config) == 218_103_808
    assert 32 * block_weights(config) == config.num_params - 2 * 126_464 * 4096 - 65 * 4096
    # Prompt 256 + gen 256 = 512 positions, LM head on the 32 of the block, batch 1:
    #   matmuls   2 x 6,979,321,856 x 512            = 7,146,825,580,544
    #   attention 4 x 32 x 512 x 512 x 32 x 128      =   137,438,953,472
    #   head      2 x 4096 x 126,464 x 32            =    33,151,778,816
    assert forward_flops(config, 1, 512, head_positions=32) == 7_317_416_312_832
    # The head on the whole canvas costs 2 x 4096 x 126,464 x 480 = 497,276,682,240 more.
    assert (forward_flops(config, 1, 512) - forward_flops(config, 1, 512, head_positions=32)
            == 497_276_682_240)
    # A cached window of 32 queries over 512 keys, 2 rows (CFG): every term scales.
    window = 2 * (2 * 6_979_321_856 * 32 + 4 * 32 * 32 * 512 * 32 * 128 + 2 * 4096 * 126_464 * 32)
    assert forward_flops(config, 2, 32, keys=512, head_positions=32) == window


def test_bandwidth_lookup_and_roofline():
    assert peak_bandwidth_per_device("NVIDIA H200") == 4.8e12
    assert peak_bandwidth_per_device("TPU v5 lite") == 819e9
    assert peak_bandwidth_per_device("cpu") is None
    assert peak_bandwidth_per_device("cpu", override_gbps=100.0) == 100e9
    # 7.3 TFLOP on 989 TFLOP/s = 7.40 ms; 16 GB on 4.8 TB/s = 3.33 ms: compute bound.
    assert roofline_seconds(7.317e12, 16e9, 989e12, 4.8e12) == 7.317e12 / 989e12
    assert roofline_seconds(1e9, 16e9, 989e12, 4.8e12) == 16e9 / 4.8e12
    assert roofline_seconds(1e9, 16e9, None, 4.8e12) is None


def test_moe_flops_count_active_parameters_by_hand():
    """LLaDA-MoE-7B-A1B (16 layers, 64 experts of 1024, 8 per token): per layer the attention
    2048 x 128 x 64 = 16,777,216, the router 2048 x 64 = 131,072 and 8 experts of 3 x 2048 x 1024
    = 50,331,648: 67,239,936 matmul weights per token, x 16 = 1,075,838,976."""
    from configs.llada_moe_7b import LLADA_MOE_7B as moe

    assert active_block_weights(moe) == 16 * (16_777_216 + 131_072 + 50_331_648) == 1_075_838_976
    # Training: N = 1,397,823,488 active matmul params (the blocks' 1,075,838,976 plus the
    # norm scales 16 x (2 x 2048 + 2 x 128) + 2048 and the untied head 157,184 x 2048).
    n = 1_075_838_976 + 16 * (2 * 2048 + 2 * 128) + 2048 + 157_184 * 2048
    assert n == moe.num_matmul_params == 1_397_823_488
    flops = train_flops_per_step(moe, batch_size=4, seq_len=1024)
    assert flops == 6 * n * 4 * 1024 + 12 * 16 * 1024 ** 2 * (16 * 128) * 4
    # A sampler pass of 64 positions, head on all of them.
    assert forward_flops(moe, 1, 64) == (2 * 1_075_838_976 * 64 + 4 * 16 * 64 * 64 * 2048
                                         + 2 * 2048 * 157_184 * 64)


def test_dense_and_tied_models_keep_their_counts():
    """A dense model's active weights are all of its blocks; tying drops one vocab table from
    the parameters but not from the training FLOPs (the table is the LM head's matmul)."""
    import dataclasses

    config = ModelConfig()
    assert active_block_weights(config) == 32 * block_weights(config)
    tied = dataclasses.replace(config, tie_embeddings=True)
    assert tied.num_params == config.num_params - 126_464 * 4096
    assert train_flops_per_step(tied, 8, 4096) == train_flops_per_step(config, 8, 4096)
