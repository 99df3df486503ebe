"""The optimizer's parameter groups by name on the tiny preset: X-FM's rules (optim.lr_x2 and
optim.no_decay_rule: reference; create_optimizer and XFMBase.init_params in zhangxinsong-nlp/XFM)
and xfm_scale's (new_modules / xfm_scale). Every parameter name is listed here by hand, so a new
parameter, or a change of either rule, fails the test."""
from __future__ import annotations

import pytest

from xfm_scale import XFMConfig, build_model
from xfm_scale.config.run import OptimSection
from xfm_scale.engine.optim import param_groups

pytestmark = pytest.mark.unit
LAYERS = 2  # blocks per encoder in the tiny preset

# (name, decayed under the reference rule, decayed under xfm_scale's rule)
BOTH, NEITHER, REFERENCE_ONLY = (True, True), (False, False), (True, False)


def _blocks(prefix: str, entries: dict[str, tuple[bool, bool]]) -> dict[str, tuple[bool, bool]]:
    return {f"{prefix}.blocks.{i}.{n}": d for i in range(LAYERS) for n, d in entries.items()}


DECAY = {
    "text.embeddings.word_embeddings.weight": BOTH, "text.embeddings.position_embeddings.weight": BOTH,
    "text.embeddings.token_type_embeddings.weight": BOTH,
    "text.embeddings.norm.weight": NEITHER, "text.embeddings.norm.bias": NEITHER,
    **_blocks("text", {"attn.qkv.weight": BOTH, "attn.qkv.bias": NEITHER, "attn.proj.weight": BOTH,
                       "attn.proj.bias": NEITHER, "attn_norm.weight": NEITHER, "attn_norm.bias": NEITHER,
                       "mlp.fc1.weight": BOTH, "mlp.fc1.bias": NEITHER, "mlp.fc2.weight": BOTH,
                       "mlp.fc2.bias": NEITHER, "mlp_norm.weight": NEITHER, "mlp_norm.bias": NEITHER}),
    # the reference decays the tokens and the layer-scale gammas; xfm_scale (timm's list) does not
    "vision.cls_token": REFERENCE_ONLY, "vision.mask_token": REFERENCE_ONLY,
    "vision.patch_embed.proj.weight": BOTH, "vision.patch_embed.proj.bias": NEITHER,
    **_blocks("vision", {"gamma_1": REFERENCE_ONLY, "gamma_2": REFERENCE_ONLY,
                         "norm1.weight": NEITHER, "norm1.bias": NEITHER,
                         "attn.q_bias": NEITHER, "attn.v_bias": NEITHER, "attn.qkv.weight": BOTH,
                         "attn.proj.weight": BOTH, "attn.proj.bias": NEITHER,
                         "rel_pos.relative_position_bias_table": NEITHER,  # "bias" in its name
                         "norm2.weight": NEITHER, "norm2.bias": NEITHER,
                         "mlp.fc1.weight": BOTH, "mlp.fc1.bias": NEITHER, "mlp.fc2.weight": BOTH,
                         "mlp.fc2.bias": NEITHER}),
    "vision.fc_norm.weight": NEITHER, "vision.fc_norm.bias": NEITHER,
    "fusion.image_norm.weight": NEITHER, "fusion.image_norm.bias": NEITHER,
    **_blocks("fusion", {"self_attn.qkv.weight": BOTH, "self_attn.qkv.bias": NEITHER,
                         "self_attn.proj.weight": BOTH, "self_attn.proj.bias": NEITHER,
                         "self_norm.weight": NEITHER, "self_norm.bias": NEITHER,
                         "cross_attn.q.weight": BOTH, "cross_attn.q.bias": NEITHER,
                         "cross_attn.kv.weight": BOTH, "cross_attn.kv.bias": NEITHER,
                         "cross_attn.proj.weight": BOTH, "cross_attn.proj.bias": NEITHER,
                         "cross_norm.weight": NEITHER, "cross_norm.bias": NEITHER,
                         "mlp.fc1.weight": BOTH, "mlp.fc1.bias": NEITHER, "mlp.fc2.weight": BOTH,
                         "mlp.fc2.bias": NEITHER, "mlp_norm.weight": NEITHER, "mlp_norm.bias": NEITHER}),
    **{f"{head}.{n}": d for head in ("text_mlm_head", "fusion_mlm_head")
       for n, d in {"bias": NEITHER, "dense.weight": BOTH, "dense.bias": NEITHER,
                    "layer_norm.weight": NEITHER, "layer_norm.bias": NEITHER}.items()},
    "itc.temp": REFERENCE_ONLY,  # the reference decays the temperature
    "itc.text_proj.weight": BOTH, "itc.text_proj.bias": NEITHER,
    "itc.vision_proj.weight": BOTH, "itc.vision_proj.bias": NEITHER,
    "itm_head.0.weight": BOTH, "itm_head.0.bias": NEITHER,
    "itm_head.1.weight": REFERENCE_ONLY,  # the head's LayerNorm: no "norm" in its name
    "itm_head.1.bias": NEITHER, "itm_head.3.weight": BOTH, "itm_head.3.bias": NEITHER,
}
# lr x2: the reference's ITC and ITM only; xfm_scale's every module but text, vision, text_mlm_head
X2 = {"reference": ("itc.", "itm_head."), "new_modules": ("fusion.", "fusion_mlm_head.", "itc.", "itm_head.")}


@pytest.fixture(scope="module")
def model():
    return build_model(XFMConfig.from_preset("tiny"))


def groups_by_name(model, cfg: OptimSection) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in param_groups(model, cfg):
        for p in group["params"]:
            out[names[id(p)]] = group
    return out


@pytest.mark.parametrize("lr_x2", ["reference", "new_modules"])
@pytest.mark.parametrize("rule", ["reference", "xfm_scale"])
def test_groups_by_parameter_name(model, lr_x2, rule):
    cfg = OptimSection(lr=1e-4, weight_decay=0.01, new_param_lr_scale=2.0, lr_x2=lr_x2, no_decay_rule=rule)
    by_name = groups_by_name(model, cfg)
    assert sorted(by_name) == sorted(DECAY) == sorted(n for n, _ in model.named_parameters())
    labels = ("pretrained", "new") if lr_x2 == "new_modules" else ("base_lr", "lr_x2")
    for name, group in by_name.items():
        scaled = name.startswith(X2[lr_x2])
        decayed = DECAY[name][0 if rule == "reference" else 1]
        assert group["lr"] == pytest.approx(2e-4 if scaled else 1e-4), name
        assert group["lr_scale"] == (2.0 if scaled else 1.0), name
        assert group["weight_decay"] == (0.01 if decayed else 0.0), name
        assert group["name"] == f"{labels[scaled]}/{'decay' if decayed else 'no_decay'}", name
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == [f"{labels[0]}/decay", f"{labels[0]}/no_decay",
                                           f"{labels[1]}/decay", f"{labels[1]}/no_decay"]


def test_reference_trains_the_fusion_encoder_at_the_base_lr(model):
    """The point of the switch: X-FM's 113M-parameter fusion encoder (and its MLM head) at lr x1."""
    ref = groups_by_name(model, OptimSection(lr_x2="reference"))
    ours = groups_by_name(model, OptimSection())
    fusion = [n for n in DECAY if n.startswith(("fusion.", "fusion_mlm_head."))]
    assert len(fusion) == 2 + LAYERS * 20 + 5
    assert {ref[n]["lr_scale"] for n in fusion} == {1.0} and {ours[n]["lr_scale"] for n in fusion} == {2.0}
    x2 = sorted(n for n, g in ref.items() if g["lr_scale"] == 2.0)
    assert x2 == ["itc.temp", "itc.text_proj.bias", "itc.text_proj.weight", "itc.vision_proj.bias",
                  "itc.vision_proj.weight", "itm_head.0.bias", "itm_head.0.weight", "itm_head.1.bias",
                  "itm_head.1.weight", "itm_head.3.bias", "itm_head.3.weight"]


def test_default_is_unchanged_for_existing_configs():
    cfg = OptimSection()
    assert (cfg.lr_x2, cfg.no_decay_rule) == ("new_modules", "xfm_scale")
    assert cfg.pretrained_modules == ["text", "vision", "text_mlm_head"]


def test_unknown_choices_are_refused(model):
    with pytest.raises(ValueError, match="optim.lr_x2='all'"):
        param_groups(model, OptimSection(lr_x2="all"))
    with pytest.raises(ValueError, match="optim.no_decay_rule='timm'"):
        param_groups(model, OptimSection(no_decay_rule="timm"))
