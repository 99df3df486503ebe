"""The analytic FLOP count (xfm_scale.train.flops) against torch's FlopCounterMode on the real model.

FlopCounterMode counts matmuls, convolutions and the fused attention kernels it knows. On CPU the
default SDPA kernel for boolean masks is ``_scaled_dot_product_flash_attention_for_cpu``, which it
does not know (those attention FLOPs would go uncounted), so the measurements run under the MATH
SDPA backend: attention becomes two batched matmuls that it does count, and every FLOP of the
analytic count is measured.
"""
import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))
from model_fixtures import batches, tiny_config  # noqa: E402

from xfm_scale import XFMConfig, build_model, distributed  # noqa: E402
from xfm_scale.batch import IGNORE_INDEX, PairBatch  # noqa: E402
from xfm_scale.train.flops import (FlopCount, achieved_tflops, device_peak_flops, gpu_peak_flops,  # noqa: E402
                             micro_batch_flop_breakdown, micro_batch_flops, mfu)
from xfm_scale.model import hooks  # noqa: E402

pytestmark = pytest.mark.unit
KINDS = ("text", "image", "pair")
TOLERANCE = 0.005  # they agree exactly today; the brief asks for 2%, we hold 0.5%


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    distributed.initialize(tensor_parallel_size=1, seed=5)  # installs DeepSpeed's (non-reentrant) checkpoint
    yield


@pytest.fixture
def torch_checkpoint_hook():
    """Swap in torch's checkpoint (the plain-process default) for one test."""
    saved = hooks.HOOKS.checkpoint
    hooks.HOOKS.checkpoint = hooks._torch_checkpoint
    yield
    hooks.HOOKS.checkpoint = saved


def measured_flops(model, batch, train: bool) -> int:
    """FLOPs FlopCounterMode sees in the model's forward (and backward of the summed losses)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(batch)
        if train and out.losses:
            out.total.backward()
    return counter.get_total_flops()


def assert_close(analytic: int, measured: int, what: str) -> None:
    assert measured > 0, f"{what}: nothing measured"
    assert abs(analytic - measured) / measured < TOLERANCE, f"{what}: analytic {analytic:,} vs measured {measured:,}"


def check_model(cfg: XFMConfig, kinds=KINDS, train: bool = True) -> None:
    torch.manual_seed(0)
    model = build_model(cfg)
    for kind, batch in zip(KINDS, batches(cfg)):
        if kind not in kinds:
            continue
        count = micro_batch_flops(cfg, batch)
        assert_close(count.forward, measured_flops(model, batch, train=False), f"{kind} forward")
        if train:
            model.zero_grad(set_to_none=True)
            assert_close(count.total, measured_flops(model, batch, train=True), f"{kind} forward+backward")


def test_forward_and_training_flops_match_the_real_model():
    check_model(tiny_config())


def test_without_the_stop_gradient_the_text_encoder_backward_is_counted():
    cfg = tiny_config()
    cfg.objectives.detach_text_for_fusion = False
    check_model(cfg, kinds=("pair",))
    # and it differs from the detached count by the masked-caption pass's backward + decoder wgrad
    on, off = tiny_config(), cfg
    pair = batches(cfg)[2]
    assert micro_batch_flops(off, pair).backward > micro_batch_flops(on, pair).backward
    assert micro_batch_flops(off, pair).forward == micro_batch_flops(on, pair).forward


def test_mim_off_drops_the_image_passes():
    cfg = tiny_config()
    cfg.objectives.mim_target = "none"
    check_model(cfg, kinds=("pair",))
    model, image = build_model(cfg), batches(cfg)[1]
    assert micro_batch_flops(cfg, image) == FlopCount()
    assert measured_flops(model, image, train=True) == 0
    pair_with_mim = micro_batch_flops(tiny_config(), batches(cfg)[2])
    assert micro_batch_flops(cfg, batches(cfg)[2]).forward < pair_with_mim.forward


def test_activation_checkpointing_recompute_matches_deepspeed_checkpoint():
    cfg = tiny_config()
    cfg.set_activation_checkpointing(True)
    assert hooks.HOOKS.name == "deepspeed"
    check_model(cfg)


def test_selective_checkpointing_recomputes_only_the_first_blocks():
    """vision: its first block of 2 checkpointed, text: all, fusion: none. The measured recompute
    (FlopCounterMode sees the replayed forwards) is the analytic count of exactly those blocks."""
    cfg = tiny_config(**{"vision.checkpointed_layers": 1})
    cfg.set_activation_checkpointing(True)
    cfg.fusion.activation_checkpointing = False
    assert [e.checkpointed_blocks for e in (cfg.text, cfg.vision, cfg.fusion)] == [2, 1, 0]
    check_model(cfg)
    pair = batches(cfg)[2]
    full = micro_batch_flops(cfg, pair, activation_checkpointing=True)
    selective = micro_batch_flop_breakdown(cfg, pair)
    assert 0 < sum(p.recompute for p in selective.values()) < full.recompute
    assert selective["itm_fusion"].recompute == 0
    assert selective["vision_unmasked"].recompute * 2 == micro_batch_flop_breakdown(
        cfg, pair, activation_checkpointing=True)["vision_unmasked"].recompute


def test_activation_checkpointing_recompute_matches_torch_checkpoint(torch_checkpoint_hook):
    cfg = tiny_config()
    cfg.set_activation_checkpointing(True)
    check_model(cfg, kinds=("pair",))


def test_no_grad_passes_get_no_backward():
    cfg = tiny_config()
    _, image, pair = batches(cfg)
    parts = micro_batch_flop_breakdown(cfg, image)
    assert parts["vision_mim_target"].backward == 0 and parts["vision_mim_masked"].backward > 0
    parts = micro_batch_flop_breakdown(cfg, pair, activation_checkpointing=True)
    # detached masked caption: checkpointed, but never back-propagated, hence never recomputed
    assert parts["text_masked_caption"].backward == parts["text_masked_caption"].recompute == 0
    assert parts["text_caption"].recompute == parts["text_caption"].forward


def test_checkpointing_override_adds_one_forward_of_the_blocks():
    cfg = tiny_config()
    text = batches(cfg)[0]
    plain, ckpt = micro_batch_flops(cfg, text), micro_batch_flops(cfg, text, activation_checkpointing=True)
    heads = micro_batch_flop_breakdown(cfg, text)["mlm_head"].forward
    assert plain.recompute == 0 and ckpt.recompute == plain.forward - heads
    assert ckpt.total == plain.total + ckpt.recompute


def _base_pair(B: int = 8, L: int = 30, masked_per_caption: int = 15) -> tuple[XFMConfig, PairBatch]:
    cfg = XFMConfig.from_preset("base")
    labels = torch.full((B, L), IGNORE_INDEX)
    labels[:, 1:1 + masked_per_caption] = 7
    ids = torch.zeros(B, L, dtype=torch.long)
    return cfg, PairBatch(pixel_values_BCHW=torch.zeros(B, 3, 224, 224), caption_ids_BL=ids,
                          caption_mask_BL=torch.ones(B, L, dtype=torch.long), imlm_input_ids_BL=ids,
                          imlm_labels_BL=labels, mim_mask_BP=torch.zeros(B, 196, dtype=torch.bool))


def test_base_pair_forward_is_about_two_flops_per_weight_per_token():
    """Leading term by hand: 2 x (matmul weights) x (tokens they see), summed over the passes; the
    analytic count adds attention scores/values, the patch embedding and small heads (a few %)."""
    B, L, N, D, F, V, M = 8, 30, 197, 768, 3072, 50304, 8 * 15
    cfg, pair = _base_pair(B, L)
    layer = 4 * D * D + 2 * D * F                            # QKV + out + MLP weights of one block
    vision = 2 * (12 * layer) * (B * N) * 2                  # unmasked + masked passes
    text = 2 * (12 * layer) * (B * L) * 2                    # caption + masked caption passes
    fusion_rows = 3 * B + B                                  # ITM (3B) + IMLM (B)
    # fusion blocks: the block weights + cross q/out on the text tokens, cross k/v on the image
    # tokens of the B images (all 4B rows attend to them; their keys and values are projected once)
    fusion = 2 * 12 * ((layer + 2 * D * D) * fusion_rows * L + 2 * D * D * B * N)
    decoder = 2 * M * D * V                                  # IMLM decoder at the masked positions
    leading = vision + text + fusion + decoder
    count = micro_batch_flops(cfg, pair)
    assert 1.0 < count.forward / leading < 1.08, count.forward / leading
    # training: ~3x forward, less the detached masked-caption pass (no backward) and 1x conv backward
    assert 2.7 < count.total / count.forward < 3.0, count.total / count.forward
    # ~0.9 TFLOP forward for 8 pairs, linear in the batch (only the tiny ITC matrices are quadratic)
    assert 0.85e12 < count.forward < 0.95e12
    assert 1.99 < micro_batch_flops(*_base_pair(2 * B, L)).forward / count.forward < 2.01


def test_data_parallel_size_grows_only_the_itc_matrix():
    cfg, pair = _base_pair()
    one, eight = (micro_batch_flop_breakdown(cfg, pair, data_parallel_size=n) for n in (1, 8))
    E, B = cfg.objectives.itc_embed_dim, 8
    assert eight["itc"].forward - one["itc"].forward == 2 * E * ((8 * B) ** 2 - B ** 2)
    assert {k: v for k, v in one.items() if k != "itc"} == {k: v for k, v in eight.items() if k != "itc"}
    # every rank computes the whole gathered similarity; the model's FLOPs (MFU) count its 1/8 share
    similarity = 3 * 2 * E * (8 * B) ** 2  # forward + backward
    assert one["itc"].repeated == 0 and eight["itc"].repeated == similarity - similarity // 8
    assert eight["itc"].model - one["itc"].model == similarity // 8 - 3 * 2 * E * B ** 2
    assert eight["itc"].total == eight["itc"].forward + eight["itc"].backward  # the hardware did it all


def test_flop_count_adds_and_totals():
    a, b = FlopCount(1, 2, 3), FlopCount(10, 20, 0, repeated=6)
    assert (a + b) == FlopCount(11, 22, 3, repeated=6) and (a + b).total == 36 and (a + b).model == 27
    assert (a + b) / 2 == FlopCount(5.5, 11, 1.5, repeated=3)


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, 67e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
    ("NVIDIA H100 NVL", torch.float16, 835.5e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100-PCIE-40GB", torch.float32, 19.5e12),
])
def test_gpu_peak_table(name, dtype, expected):
    peak, source = gpu_peak_flops(name, dtype)
    assert peak == expected and "spec sheet" in source


def test_gpu_peak_fp32_uses_tf32_when_allowed_and_unknown_gpu_is_none():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32)[0] == 494.7e12
    finally:
        torch.set_float32_matmul_precision(saved)
    assert gpu_peak_flops("Tesla T4", torch.bfloat16) is None


def test_cpu_peak_is_a_cached_measured_matmul_peak():
    peak, source = device_peak_flops(torch.float32, "cpu")
    assert source.startswith("measured matmul peak")
    assert 1e8 < peak < 1e14  # a CPU: between 0.1 GFLOP/s and 100 TFLOP/s
    assert device_peak_flops(torch.float32, "cpu")[0] == peak  # measured once, then cached


def test_mfu_and_achieved_tflops():
    assert mfu(3e14, 2.0, 3e14) == 0.5
    assert achieved_tflops(3e12, 1.5) == 2.0
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)
