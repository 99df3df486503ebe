"""Multi-rank model tests on real gloo processes: TP=2 equals TP=1, and activation checkpointing
(DeepSpeed's, with its RNG tracker) gives the gradients of a plain run with dropout on."""
import pytest
import torch

from harness import run_ranks
from model_fixtures import batches, relative_error, tiny_config

pytestmark = pytest.mark.dist

ENCODERS = ("text", "vision", "fusion")


def _encoder_probe(model, cfg, name: str) -> torch.Tensor:
    """Run one encoder on fixed inputs; return its output."""
    text, _, pair = batches(cfg, seed=3)
    if name == "text":
        return model.encode_text(text.input_ids_BL, text.attention_mask_BL)
    if name == "vision":
        return model.encode_image(pair.pixel_values_BCHW)
    g = torch.Generator().manual_seed(9)
    L, N = pair.caption_ids_BL.shape[1], 1 + cfg.vision.num_patches
    text_in = torch.randn(4, L, cfg.text.hidden_size, generator=g)
    image_in = torch.randn(4, N, cfg.vision.hidden_size, generator=g)
    return model.fuse(text_in, pair.caption_mask_BL, image_in)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def tp_parity_rank(tp: int, weights_path: str):
    """Build the tiny model at TP=tp holding the full weights in ``weights_path`` (written by the
    TP=1 run if absent); return outputs and this rank's gradient shards."""
    from xfm_scale import distributed
    from xfm_scale.model import tp_layout
    from xfm_scale.model.xfm import XFM

    layout = distributed.initialize(tensor_parallel_size=tp, seed=21)
    cfg = tiny_config()
    model = XFM(cfg)
    specs = tp_layout.model_partition_specs(model)
    if tp == 1:
        torch.save(model.state_dict(), weights_path)
    else:
        full = torch.load(weights_path, weights_only=True)
        model.load_state_dict(tp_layout.shard_state_dict(specs, full, layout.tensor_parallel_rank, tp))
    result = {"specs": specs}
    for name in ENCODERS:
        model.zero_grad(set_to_none=True)
        out = _encoder_probe(model, cfg, name)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * probe).sum().backward()
        result[name] = {"out": out.detach(), "grads": _grads(model)}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(99)  # ITM's hard negatives draw from the default generator
    outputs = [model(b) for b in batches(cfg, seed=4)]
    total = sum(o.total for o in outputs)
    total.backward()
    result["loss"] = {"total": total.item(), "parts": {k: v.item() for o in outputs for k, v in o.losses.items()},
                      "grads": _grads(model)}
    # a bad TP layout fails at construction with the fix named
    bad = tiny_config(**{"text.ffn_hidden_size": 255})
    try:
        XFM(bad) if tp == 2 else None
        result["config_error"] = None
    except ValueError as err:
        result["config_error"] = str(err)
    return result


def _merged(specs, per_rank_grads: list[dict]) -> dict[str, torch.Tensor]:
    from xfm_scale.model import tp_layout

    return tp_layout.merge_state_dicts(specs, per_rank_grads)


def test_tp2_equals_tp1_outputs_losses_and_gradients(tmp_path):
    weights = str(tmp_path / "full.pt")
    (ref,) = run_ranks(tp_parity_rank, 1, 1, weights)
    ranks = run_ranks(tp_parity_rank, 2, 2, weights)
    specs = ranks[0]["specs"]
    assert any(s is not None and s[1] == 3 for s in specs.values()), "fused QKV must be strided"
    for name in ENCODERS + ("loss",):
        expected = ref[name]["grads"]
        merged = _merged(specs, [r[name]["grads"] for r in ranks])
        assert set(merged) == set(expected), name
        assert len(expected) > 10
        worst = max(relative_error(merged[k], expected[k]) for k in expected)
        assert worst < 1e-5, f"{name}: worst relative gradient error {worst:.2e}"
    for name in ENCODERS:
        for r in ranks:  # every TP rank holds the full (replicated) output
            assert relative_error(r[name]["out"], ref[name]["out"]) < 1e-5, name
    for r in ranks:
        assert abs(r["loss"]["total"] - ref["loss"]["total"]) / ref["loss"]["total"] < 1e-5
        assert set(r["loss"]["parts"]) == {"mlm", "mim", "itc", "itm", "imlm"}
    assert "text: ffn_hidden_size=255 is not divisible by the tensor-parallel size 2" in ranks[0]["config_error"]


def checkpointing_rank(tp: int):
    """Gradients of all three micro-batch kinds with dropout and drop-path on, with and without
    per-layer activation checkpointing through DeepSpeed's checkpoint, from the same seed."""
    from xfm_scale import distributed
    from xfm_scale.model import hooks
    from xfm_scale.model.xfm import XFM

    distributed.initialize(tensor_parallel_size=tp, seed=5)
    cfg = tiny_config(dropout=True)
    model = XFM(cfg)
    assert hooks.HOOKS.name == "deepspeed"
    calls = {"n": 0}
    ds_checkpoint = hooks.HOOKS.checkpoint

    def counting_checkpoint(fn, *args):
        calls["n"] += 1
        return ds_checkpoint(fn, *args)

    hooks.HOOKS.checkpoint = counting_checkpoint

    def run(checkpointing: bool, seed: int):
        cfg.set_activation_checkpointing(checkpointing)
        distributed.seed_everything(seed)
        model.zero_grad(set_to_none=True)
        losses = [model(b) for b in batches(cfg, seed=2)]
        sum(o.total for o in losses).backward()
        return _grads(model), sum(o.total.item() for o in losses)

    plain, plain_loss = run(False, 13)
    assert calls["n"] == 0
    ckpt, ckpt_loss = run(True, 13)
    used = calls["n"]
    other_seed, _ = run(False, 14)
    return {"plain": plain, "ckpt": ckpt, "other": other_seed, "calls": used,
            "losses": (plain_loss, ckpt_loss)}


@pytest.mark.parametrize("tp", [1, 2])
def test_activation_checkpointing_gradients_equal_plain(tp):
    results = run_ranks(checkpointing_rank, tp, tp)
    for r in results:
        # text 2 blocks x (text batch, pair caption, masked caption) ... every encoder checkpointed
        assert r["calls"] >= 2 * 5
        assert abs(r["losses"][0] - r["losses"][1]) < 1e-6 * abs(r["losses"][0])
        worst = max(relative_error(r["ckpt"][k], r["plain"][k]) for k in r["plain"])
        assert worst < 1e-6, f"checkpointed gradients differ: {worst:.2e}"
        # dropout is really on: another seed gives other gradients, so equality above is not vacuous
        assert max(relative_error(r["other"][k], r["plain"][k]) for k in r["plain"]) > 1e-3
