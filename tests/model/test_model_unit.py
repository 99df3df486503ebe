"""Single-process model tests: the stop-gradient, the MIM target, sizes, config errors, layout."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from harness import tool_env
from model_fixtures import batches, tiny_config
from xfm_scale import PRESETS, ConfigError, XFMConfig, build_model
from xfm_scale.model import tp_layout

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("world_of_one")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return sum(g.float().norm().item() ** 2 for g in grads if g is not None) ** 0.5


def test_public_api_shapes():
    cfg = tiny_config()
    model = build_model(cfg)
    text, _, pair = batches(cfg)
    hidden = model.encode_text(text.input_ids_BL, text.attention_mask_BL)
    tokens = model.encode_image(pair.pixel_values_BCHW)
    assert hidden.shape == (4, cfg.objectives.text_max_length, cfg.text.hidden_size)
    assert tokens.shape == (4, 1 + cfg.vision.num_patches, cfg.vision.hidden_size)
    # index 0 is the pooled vector: fc_norm of the mean patch token
    expected_pooled = model.vision.fc_norm(tokens[:, 1:].mean(1))
    torch.testing.assert_close(tokens[:, 0], expected_pooled)


def test_a_bf16_model_holds_every_parameter_in_bf16():
    """Built outside DeepSpeed (which casts every parameter), a bf16 model's LayerNorms are bf16 too:
    CUDA's LayerNorm refuses fp32 weights with a bf16 input, which the CPU kernel accepts; the GPU
    tests build their models so. Its losses are finite on every micro-batch kind."""
    cfg = tiny_config()
    cfg.params_dtype = "bfloat16"
    model = build_model(cfg)
    assert {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16} == {}
    for batch in batches(cfg):
        out = model(batch.to(dtype=torch.bfloat16))
        assert out.losses and torch.isfinite(out.total.float()), batch.modality


def test_stop_gradient_on_language_encoder_gets_only_mlm_and_itc():
    cfg = tiny_config()
    model = build_model(cfg)
    text_params = list(model.text.parameters())
    vision_params = list(model.vision.parameters())
    text_batch, _, pair = batches(cfg)
    out = model(pair, return_intermediates=True)
    assert set(out.losses) == {"itc", "itm", "imlm", "mim"}
    assert _grad_norm(out.losses["itm"], text_params) == 0.0
    assert _grad_norm(out.losses["imlm"], text_params) == 0.0
    assert _grad_norm(out.losses["itc"], text_params) > 0.0
    assert _grad_norm(model(text_batch).losses["mlm"], text_params) > 0.0
    # the detach cuts the text side only: ITM and IMLM still train the vision encoder
    assert _grad_norm(out.losses["itm"], vision_params) > 0.0
    assert _grad_norm(out.losses["imlm"], vision_params) > 0.0


def test_stop_gradient_off_lets_imlm_and_itm_reach_language_encoder():
    cfg = tiny_config()
    cfg.objectives.detach_text_for_fusion = False
    model = build_model(cfg)
    out = model(batches(cfg)[2])
    text_params = list(model.text.parameters())
    assert _grad_norm(out.losses["imlm"], text_params) > 0.0
    assert _grad_norm(out.losses["itm"], text_params) > 0.0


def test_mim_target_is_the_detached_unmasked_output_itc_and_itm_consume():
    cfg = tiny_config()
    model = build_model(cfg)
    out = model(batches(cfg)[2], return_intermediates=True)
    target, consumed = out.intermediates["mim_target"], out.intermediates["image_tokens"]
    assert not target.requires_grad and consumed.requires_grad
    assert torch.equal(target, consumed.detach())
    # the MIM loss sends nothing back through the target branch
    (grad,) = torch.autograd.grad(out.losses["mim"], [consumed], allow_unused=True, retain_graph=True)
    assert grad is None
    # and the target really is the unmasked image's output: re-encoding gives the same tokens
    torch.testing.assert_close(model.encode_image(batches(cfg)[2].pixel_values_BCHW), target, rtol=0, atol=1e-6)


def _pair_losses_in_separate_passes(model, b) -> dict[str, torch.Tensor]:
    """The reference's way: six encoder calls (vision unmasked and masked, text caption and masked
    caption, fusion for ITM and for IMLM), each on its own rows."""
    from xfm_scale.model.losses import contrastive_loss, mim_loss, sample_hard_negatives

    objectives = model.config.objectives
    detach = (lambda x: x.detach()) if objectives.detach_text_for_fusion else (lambda x: x)
    image = model.vision(b.pixel_values_BCHW)
    text = model.text(b.caption_ids_BL, b.caption_mask_BL)
    image_feat, text_feat, temp = model.itc(image[:, 0], text[:, 0])
    neg_image, neg_text = sample_hard_negatives(image_feat, text_feat, temp, b.sample_keys,
                                                model.config.objectives.itm_negative_group)
    t, m = detach(text), b.caption_mask_BL
    fused = model.fusion(torch.cat([t, t, t[neg_text]]), torch.cat([m, m, m[neg_text]]),
                         torch.cat([image, image[neg_image], image]))
    B = t.shape[0]
    itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()
    masked_text = detach(model.text(b.imlm_input_ids_BL, m))
    losses = {"itc": contrastive_loss(image_feat, text_feat, temp, None),
              "itm": torch.nn.functional.cross_entropy(model.itm_head(fused[:, 0]), itm_labels),
              "imlm": model.fusion_mlm_head(model.fusion(masked_text, m, image), b.imlm_labels_BL)}
    if objectives.mim_target != "none":
        losses["mim"] = mim_loss(model.vision(b.pixel_values_BCHW, b.mim_mask_BP), image.detach(), b.mim_mask_BP)
    return losses


@pytest.mark.parametrize("detach, mim", [(True, "unmasked_self"), (False, "unmasked_self"), (True, "none")])
def test_merged_pair_passes_equal_the_reference_separate_passes(detach, mim):
    """The pair step's merged passes (vision 2B rows, fusion 4B rows, the detached masked caption
    without grad) give the losses and gradients of the six separate passes, with either technique
    switched off too."""
    cfg = tiny_config()
    cfg.objectives.detach_text_for_fusion, cfg.objectives.mim_target = detach, mim
    model = build_model(cfg)
    # keyed hard-negative draws: the same negatives in both computations
    pair = dataclasses.replace(batches(cfg)[2], sample_keys=tuple(f"pair-{i}" for i in range(4)))
    merged = model(pair).losses
    separate = _pair_losses_in_separate_passes(model, pair)
    assert set(merged) == set(separate)
    params = [p for p in model.parameters() if p.requires_grad]
    for name in separate:
        torch.testing.assert_close(merged[name], separate[name], rtol=1e-5, atol=1e-6, msg=name)
        got = torch.autograd.grad(merged[name], params, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(separate[name], params, allow_unused=True, retain_graph=True)
        for p, g, w in zip(params, got, want):
            assert (g is None) == (w is None) or torch.count_nonzero(g if g is not None else w) == 0, name
            if g is not None and w is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


def test_a_pair_micro_batch_of_one_is_refused_with_the_fix_named():
    """ITM draws a pair's hard negatives from the other pairs: alone, it has none (torch's
    multinomial used to fail with "invalid multinomial distribution")."""
    cfg = tiny_config()
    model = build_model(cfg)
    one_pair = batches(cfg, B=1)[2]
    with pytest.raises(ValueError, match="at least 2 pairs per negative group"):
        model(one_pair)


def test_mim_off_switch_removes_mim():
    cfg = tiny_config()
    cfg.objectives.mim_target = "none"
    model = build_model(cfg)
    _, image, pair = batches(cfg)
    assert "mim" not in model(pair).losses
    assert model(image).losses == {}


def test_padded_vocab_rows_never_predicted():
    cfg = tiny_config(**{"text.vocab_size": 1000})
    model = build_model(cfg)
    assert model.text.embeddings.word_embeddings.weight.shape[0] == 1024
    text = batches(cfg)[0]
    hidden = model.encode_text(text.input_ids_BL, text.attention_mask_BL)
    preds = model.text_mlm_head(hidden, text.mlm_labels_BL, predict=True)
    assert preds.max().item() < 1000 and preds.numel() == (text.mlm_labels_BL != -100).sum()


def test_base_preset_parameter_count_within_2_percent_of_327m():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools/model_info.py"), "--preset", "base"],
                         capture_output=True, text=True, check=True, env=tool_env())
    counts = json.loads(out.stdout)["parameters"]
    assert abs(counts["total"] - 327e6) / 327e6 < 0.02, counts["total"]
    # the encoders match the libraries they export to (method doc: RoBERTa-base 124.1M without
    # pooler, timm beitv2_base_patch16_224 85.8M); ours add 39 padded vocab rows and a mask token
    assert abs(counts["text_encoder"] - 124.1e6) < 0.1e6
    assert abs(counts["vision_encoder"] - 85.8e6) < 0.1e6
    assert counts["total"] == counts["text_encoder"] + counts["vision_encoder"] + counts["fusion_encoder"] + counts["heads_total"]


def test_model_info_lists_presets_on_unknown_name():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools/model_info.py"), "--preset", "huge"],
                         capture_output=True, text=True, env=tool_env())
    assert out.returncode == 2
    assert "unknown preset 'huge'" in out.stderr and all(name in out.stderr for name in PRESETS)


@pytest.mark.parametrize("overrides, tp, message", [
    ({}, 3, "num_heads=4 is not divisible by the tensor-parallel size 3"),
    ({"fusion.ffn_hidden_size": 250}, 4, "fusion: ffn_hidden_size=250 is not divisible by the tensor-parallel size 4"),
    ({"vision.num_heads": 5}, 1, "vision: hidden_size=64 is not divisible by num_heads=5"),
    ({"fusion.hidden_size": 96, "fusion.num_heads": 4}, 1, "fusion.hidden_size=96 must equal text.hidden_size=64"),
    ({"vision.checkpointed_layers": 3}, 1, "vision.checkpointed_layers=3 must be in 0..2 (its num_layers), or null"),
    ({"vision.drop_path_rate": 1.0}, 1, "vision.drop_path_rate=1.0 must be in [0, 1)"),
])
def test_config_errors_name_the_fix(overrides, tp, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        XFMConfig.from_preset("tiny", **overrides).validate(tp)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as err:
        XFMConfig.from_preset("medium")
    assert all(name in str(err.value) for name in ("tiny", "base", "large", "giant"))


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'text.num_layer'"):
        XFMConfig.from_preset("tiny", **{"text.num_layer": 3})


def test_config_round_trips_through_dict():
    cfg = XFMConfig.from_preset("large")
    assert XFMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_strided_shard_and_merge_round_trip():
    full = torch.arange(24.0).view(12, 2)  # rows q0 q1 q2 q3 | k... | v... for 2 ranks, stride 3
    shards = [tp_layout.shard(full, 0, 3, r, 2) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 2, 8, 10, 16, 18]  # [q_0; k_0; v_0]
    assert torch.equal(tp_layout.merge(shards, 0, 3), full)
    with pytest.raises(ValueError, match="equal chunks"):
        tp_layout.shard(torch.zeros(10, 2), 0, 3, 0, 2)


def test_itm_negatives_do_not_depend_on_the_micro_batch_split():
    """Two ranks with 4 pairs each draw the same hard negatives as one rank with the 8 pairs in
    negative groups of 4: the draw is keyed by (step seed, sample key)."""
    from xfm_scale.model.losses import sample_hard_negatives

    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=-1)
    keys, temp = tuple(f"corpus/{i}" for i in range(8)), torch.tensor([0.07])
    torch.manual_seed(11)
    whole = sample_hard_negatives(img, txt, temp, keys, group=4)
    first = sample_hard_negatives(img[:4], txt[:4], temp, keys[:4])
    second = sample_hard_negatives(img[4:], txt[4:], temp, keys[4:])
    for k in range(2):
        assert torch.equal(whole[k], torch.cat([first[k], second[k] + 4]))
        assert not torch.any(whole[k] == torch.arange(8))  # never the positive
        assert torch.all(whole[k] // 4 == torch.arange(8) // 4)  # within the group
    # the draw is random, not the arg-max: at a flat temperature other steps draw other negatives
    flat = torch.tensor([1.0])
    draws = set()
    for step_seed in range(5):
        torch.manual_seed(step_seed)
        draws.add(tuple(sample_hard_negatives(img, txt, flat, keys, group=4)[0].tolist()))
    assert len(draws) > 1


def test_run_config_overrides_refine_activation_checkpointing_per_encoder():
    from xfm_scale.config import run as run_config

    cfg = run_config.from_dict({
        "model": {"preset": "tiny", "activation_checkpointing": True,
                  "overrides": {"fusion.activation_checkpointing": False, "vision.checkpointed_layers": 1}},
        "data": {"spec": "s.yaml", "tokenizer_dir": "tok"}, "batch": {"micro_batch_size": 2, "global_batch_size": 2},
        "train": {"steps": 1}})
    model = cfg.model_config()
    assert [e.checkpointed_blocks for e in (model.text, model.vision, model.fusion)] == [2, 1, 0]


def test_deepspeed_overrides_change_keys_not_whole_sections(demo_world, tmp_path):
    from xfm_scale.config import run as run_config

    raw = {"data": {"spec": str(demo_world.spec), "tokenizer_dir": str(demo_world.tokenizer_dir)},
           "batch": {"micro_batch_size": 4, "global_batch_size": 8}, "train": {"steps": 1}}
    plain = run_config.from_dict(raw, base_dir=str(tmp_path)).deepspeed_config(1)["zero_optimization"]
    for overrides in ({"zero_optimization.stage": 2}, {"zero_optimization": {"stage": 2}}):
        cfg = run_config.from_dict({**raw, "deepspeed": {"overrides": overrides}}, base_dir=str(tmp_path))
        assert cfg.deepspeed_config(1)["zero_optimization"] == {**plain, "stage": 2}, overrides


def test_relative_paths_on_the_command_line_are_read_from_the_current_directory(demo_world, tmp_path, monkeypatch):
    """In the file: from the file's folder; given by --set (or a sweep): from where the user is."""
    import shutil

    from xfm_scale.config import run as run_config

    config_dir, cwd = tmp_path / "configs", tmp_path / "work"
    for folder in (config_dir, cwd):
        shutil.copytree(demo_world.tokenizer_dir, folder / "tok")
    (config_dir / "run.yaml").write_text(
        f"data: {{spec: {demo_world.spec}, tokenizer_dir: tok}}\n"
        "batch: {micro_batch_size: 4, global_batch_size: 8}\ntrain: {steps: 1}\n")
    monkeypatch.chdir(cwd)
    assert run_config.load(config_dir / "run.yaml").data.tokenizer_dir == str(config_dir / "tok")
    given = run_config.load(config_dir / "run.yaml", run_config.parse_overrides(["data.tokenizer_dir=tok"]))
    assert given.data.tokenizer_dir == str(cwd / "tok")
