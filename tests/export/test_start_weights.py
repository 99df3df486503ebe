"""The reference's starting weights (issue 23, item 1): roberta-base with its MLM head for the
language encoder, unilm's BEiT-v2 pre-training checkpoint (beitv2_base_patch16_224_pt1k.pth: a
shared relative-position table, a mask token, pre-training heads) for the vision encoder, both
made offline here at the tiny preset's sizes (pretrained_fixtures.py).

* Both vision key layouts (unilm's and timm's) import the same tensors, the mask token included.
* A vision checkpoint that lacks an encoder weight, holds an unexpected one or one of another
  shape is refused with exit code 2, naming the keys (the allow-list aside).
* check_init_sources / describe_starting_points: what each encoder starts from, base.yaml's
  sources, hub ids without network.
* launchers/pretrain_large.py --check with base.yaml and its sources.
* A 2-rank (TP=2) CPU run started with --set model.init_text_from / model.init_vision_from
  reproduces the sources' hidden states, MLM logits and image tokens, masked ones included.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pretrained_fixtures import (TINY_BEIT, UNILM_BLOCK_KEYS, mim_mask, reference_beit, reference_tokens, save_roberta,
                                 save_timm_layout, save_unilm, start_then_probe, unilm_state)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 500  # the demo tokenizer (438 tokens) fits
UNILM_ALLOWED = ("Only these may be left unused: head.weight, head.bias; *relative_position_index; norm.weight, "
                 "norm.bias; lm_head.*; cls_pt_layers.*; cls_pt_norm.*, cls_pt_lm_head.*. Only these may be absent: "
                 "fc_norm.weight, fc_norm.bias (docs/checkpoints.md, Import)")
TIMM_ALLOWED = ("Only these may be left unused: head.weight, head.bias; *relative_position_index. Only these may be "
                "absent: mask_token (docs/checkpoints.md, Import)")
UNILM_DESCRIPTION = ("unilm BEiT-v2 pre-training checkpoint, 2 layers x 64, patch 8, image 32: its shared "
                     "relative-position table copied into every block, mask token included; its final norm, lm_head "
                     "and cls_pt_layers dropped, fc_norm new")
FUSION_LINE = "fusion: random init (X-FM does not pretrain it either)"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    import argparse

    root = tmp_path_factory.mktemp("start_weights")
    model, mask_token = reference_beit()
    state = unilm_state(model, mask_token)
    # as unilm's save_model writes it, training args included (an argparse.Namespace)
    save_unilm(state, root / "unilm" / "beitv2_pt.pth", args=argparse.Namespace(model="beit_cls_pt", epoch=1599),
               epoch=1599)
    save_timm_layout(model, mask_token, root / "timm")
    save_roberta(root / "roberta", VOCAB)
    return {"root": root, "model": model, "mask_token": mask_token, "state": state,
            "unilm": root / "unilm" / "beitv2_pt.pth", "timm": root / "timm", "roberta": root / "roberta"}


def run_tool(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """tools/NAME.py's main(argv) in this process: (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main(argv)
    return code, capsys.readouterr().err


# ---- the two layouts ------------------------------------------------------------------------------
def test_unilm_and_timm_layouts_of_the_same_weights_import_the_same_tensors(sources):
    from xfm_scale.interop import formats
    from xfm_scale.interop.pretrained import inspect_vision, read_vision

    cfg_u, unilm = read_vision(sources["unilm"])
    cfg_t, timm_layout = read_vision(sources["timm"])
    assert cfg_u == cfg_t
    assert (cfg_u.num_layers, cfg_u.hidden_size, cfg_u.num_heads, cfg_u.ffn_hidden_size, cfg_u.image_size,
            cfg_u.patch_size, cfg_u.layer_norm_eps) == (2, 64, 4, 256, 32, 8, 1e-6)
    assert cfg_u.layer_scale_init == pytest.approx(float(sources["state"]["blocks.0.gamma_1"].mean()))
    ours = {f"vision.{k}" for k in formats.vision_shapes(cfg_u)}
    assert set(timm_layout.names) == ours
    assert set(unilm.names) == ours - {"vision.fc_norm.weight", "vision.fc_norm.bias"}  # fc_norm starts new
    for name in unilm.names:
        assert torch.equal(unilm(name, "fp32"), timm_layout(name, "fp32")), name
    assert torch.equal(unilm("vision.mask_token", "fp32"), sources["mask_token"])
    shared = sources["state"]["rel_pos_bias.relative_position_bias_table"]
    for i in range(TINY_BEIT["depth"]):
        assert torch.equal(unilm(f"vision.blocks.{i}.rel_pos.relative_position_bias_table", "fp32"), shared)
    assert inspect_vision(sources["unilm"]).description() == UNILM_DESCRIPTION
    assert inspect_vision(sources["timm"]).description() == (
        "timm BEiT-v2 folder, 2 layers x 64, patch 8, image 32: mask token included")


def test_the_import_tool_reads_the_unilm_checkpoint(sources, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "init" / "xfm"
    code, err = run_tool("import_weights", ["--vision", str(sources["unilm"]), "--preset", "tiny", "--out", str(out)],
                         capsys)
    assert code == 0, err
    vision = json.loads((out / "config.json").read_text())["model_config"]["vision"]
    assert {k: vision[k] for k in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "image_size",
                                   "patch_size")} == {"num_layers": 2, "hidden_size": 64, "num_heads": 4,
                                                      "ffn_hidden_size": 256, "image_size": 32, "patch_size": 8}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("vision.mask_token"), sources["mask_token"])
        assert torch.equal(f.get_tensor("vision.blocks.1.attn.qkv.weight"), sources["state"]["blocks.1.attn.qkv.weight"])
    assert len(names) == 2 + 2 + 16 * 2  # cls and mask tokens, patch embedding, 16 tensors per block
    assert not any(n.startswith(("vision.fc_norm.", "vision.norm.", "vision.lm_head.", "vision.cls_pt_layers."))
                   for n in names)
    # a run from that folder (model.init_from) says so for the vision encoder only
    from xfm_scale.interop.pretrained import check_init_sources

    assert check_init_sources({"init_from": str(out)}) == [
        f"text: random init (model.init_from {out} has no text.* weights)",
        f"vision: {out} (xfm weights folder, model.init_from)",
        f"fusion: random init (model.init_from {out} has no fusion.* weights)"]


# ---- strictness -----------------------------------------------------------------------------------
def _unilm_variant(sources, tmp_path, change) -> Path:
    state = dict(sources["state"])
    change(state)
    return save_unilm(state, tmp_path / "variant.pth")


def _drop(*names):
    def change(state):
        for name in names:
            del state[name]
    return change


UNILM_PREFIX = ("(unilm BEiT-v2 layout: it has rel_pos_bias.relative_position_bias_table) is not a complete BEiT-v2 "
                "encoder of 2 layers x 64: ")
REFUSED_UNILM = {
    "a layer's qkv weight missing": (_drop("blocks.0.attn.qkv.weight"), "missing blocks.0.attn.qkv.weight"),
    "a whole layer missing": (_drop(*(f"blocks.0.{k}" for k in UNILM_BLOCK_KEYS)),
                              "missing " + ", ".join(sorted(f"blocks.0.{k}" for k in UNILM_BLOCK_KEYS))),
    "the mask token missing": (_drop("mask_token"), "missing mask_token"),
    "an unexpected weight": (lambda s: s.update(pos_embed=torch.zeros(1, 17, 64)), "unexpected pos_embed"),
    "a weight of another shape": (lambda s: s.update({"blocks.1.mlp.fc2.weight": torch.zeros(64, 128)}),
                                  "of another shape blocks.1.mlp.fc2.weight (64, 128) (expected (64, 256))"),
}


@pytest.mark.parametrize("case", list(REFUSED_UNILM))
def test_an_incomplete_unilm_checkpoint_is_refused_naming_the_keys(case, sources, tmp_path, capsys):
    change, problem = REFUSED_UNILM[case]
    path = _unilm_variant(sources, tmp_path, change)
    code, err = run_tool("import_weights", ["--vision", str(path), "--preset", "tiny", "--out", str(tmp_path / "out")],
                         capsys)
    assert code == 2
    assert err == f"error: {path} {UNILM_PREFIX}{problem}. {UNILM_ALLOWED}\n"
    assert not (tmp_path / "out").exists()


def test_a_timm_folder_without_a_layer_weight_is_refused(sources, tmp_path, capsys):
    """timm's own load is not strict here (num_classes=0 differs from its pretrained_cfg's, so timm
    loads with strict=False): the file lacking blocks.0.attn.qkv.weight used to import with that
    layer left at random."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "timm"
    shutil.copytree(sources["timm"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["blocks.0.attn.qkv.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    code, err = run_tool("import_weights", ["--vision", str(folder), "--preset", "tiny", "--out", str(tmp_path / "out")],
                         capsys)
    assert code == 2
    assert err == (f"error: {folder} does not hold the weights of its config.json's model: missing "
                   "blocks.0.attn.qkv.weight. Its config.json must describe the model its weights hold. "
                   f"{TIMM_ALLOWED}\n")


# ---- what each encoder starts from ----------------------------------------------------------------
@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and no offline mode, whatever this machine's."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def cache_hub_model(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder``'s files as the Hugging Face cache holds repo ``repo_id`` at revision main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_base_yaml_names_the_reference_sources(sources, hub_cache, tmp_path, monkeypatch):
    from xfm_scale.config import ConfigError
    from xfm_scale.interop.pretrained import check_init_sources

    model = yaml.safe_load((ROOT / "launchers" / "configs" / "base.yaml").read_text())["model"]
    assert (model["init_text_from"], model["init_vision_from"]) == (
        "roberta-base", "pretrained/beitv2_base_patch16_224_pt1k.pth")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        check_init_sources(model)
    assert str(refused.value) == (
        "model.init_vision_from: vision weights pretrained/beitv2_base_patch16_224_pt1k.pth do not exist. The "
        "reference starts the vision encoder from BEiT-v2's self-supervised checkpoint "
        "beitv2_base_patch16_224_pt1k.pth (Microsoft unilm's release): download "
        "https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth to "
        "pretrained/beitv2_base_patch16_224_pt1k.pth, or give a timm BEiT-v2 folder or weights file, or set "
        "model.init_vision_from: null to train the vision encoder from scratch")
    (tmp_path / "pretrained").mkdir()
    shutil.copy(sources["unilm"], tmp_path / "pretrained" / "beitv2_base_patch16_224_pt1k.pth")  # a made-up one
    assert check_init_sources(model) == [
        f"text: roberta-base (transformers hub id, not in the Hugging Face cache ({hub_cache}): transformers "
        "downloads it when the ranks start, so every node needs the network, or download it first and name the "
        "folder; encoder and its MLM head when the checkpoint has one)",
        f"vision: pretrained/beitv2_base_patch16_224_pt1k.pth ({UNILM_DESCRIPTION})",
        FUSION_LINE]


def test_starting_points_of_local_sources_from_scratch_and_a_resume(sources, hub_cache):
    from xfm_scale.config.run import ModelSection
    from xfm_scale.interop.pretrained import check_init_sources, describe_starting_points

    local = ModelSection(init_text_from=str(sources["roberta"]), init_vision_from=str(sources["timm"]))
    assert describe_starting_points(local) == [
        f"text: {sources['roberta']} (transformers roberta folder: encoder and MLM head)",
        f"vision: {sources['timm']} (timm BEiT-v2 folder, 2 layers x 64, patch 8, image 32: mask token included)",
        FUSION_LINE]
    assert check_init_sources({"init_text_from": None, "init_vision_from": None}) == [
        "text: from scratch (random init; model.init_text_from is null)",
        "vision: from scratch (random init; model.init_vision_from is null)", FUSION_LINE]
    assert describe_starting_points(local, resume_step=40) == [
        "text, vision, fusion: resumed from the checkpoint of step 40 (model.init_* not read)"]


def test_a_hub_id_is_checked_without_network(sources, hub_cache, monkeypatch):
    from huggingface_hub import constants

    from xfm_scale.config import ConfigError
    from xfm_scale.interop.pretrained import check_init_sources

    cache_hub_model(hub_cache, "someone/tiny-roberta", sources["roberta"])
    assert check_init_sources({"init_text_from": "someone/tiny-roberta"})[0] == (
        "text: someone/tiny-roberta (transformers hub id, found in the Hugging Face cache; encoder and its MLM head "
        "when the checkpoint has one)")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as refused:
        check_init_sources({"init_text_from": "roberta-base"})
    assert str(refused.value) == (
        f"model.init_text_from: roberta-base is a hub id but HF_HUB_OFFLINE is set and it is not in the Hugging Face "
        f"cache ({hub_cache}); download it first (huggingface-cli download roberta-base --local-dir DIR, or "
        "save_pretrained) and name that folder, or unset HF_HUB_OFFLINE")
    with pytest.raises(ConfigError) as refused:
        check_init_sources({"init_text_from": "./roberta-base"})
    assert str(refused.value) == (
        "model.init_text_from: ./roberta-base does not exist; give a transformers BERT/RoBERTa folder, a hub id such "
        "as roberta-base, or null to train the language encoder from scratch")


def test_the_import_tool_loads_a_hub_id_from_the_cache_offline(sources, tmp_path):
    """A hub id goes to transformers, which reads the cache (HF_HUB_OFFLINE: no network at all)."""
    from safetensors import safe_open

    from xfm_scale.interop.pretrained import read_hf_text

    cache = tmp_path / "hub"
    cache_hub_model(cache, "someone/tiny-roberta", sources["roberta"])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(ROOT)}
    out = tmp_path / "xfm"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_weights.py"), "--text", "someone/tiny-roberta",
                             "--preset", "tiny", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    _, local = read_hf_text(sources["roberta"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(local.names)
        for name in local.names:
            assert torch.equal(f.get_tensor(name), local(name, "fp32")), name


# ---- the launcher's --check -----------------------------------------------------------------------
def check(demo_world, *sets: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "launchers" / "pretrain_large.py"), "--check", "--num_gpus", "8",
            "--config", str(ROOT / "launchers" / "configs" / "base.yaml"),
            "--set", f"data.spec={demo_world.spec}", "--set", f"data.tokenizer_dir={demo_world.tokenizer_dir}"]
    for value in sets:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **(env or {})})


def test_base_yaml_passes_check_with_offline_sources(sources, demo_world):
    result = check(demo_world, f"model.init_text_from={sources['roberta']}", f"model.init_vision_from={sources['unilm']}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "ok: 8 ranks, TP=1, DP=8, global batch 3072"



def test_base_yaml_as_shipped_passes_check_with_its_sources(sources, demo_world, tmp_path):
    """base.yaml's own init_text_from (the hub id roberta-base, accepted without network) with a
    made-up unilm file for init_vision_from; --check prints what each encoder starts from."""
    result = check(demo_world, f"model.init_vision_from={sources['unilm']}", env={"HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ok: 8 ranks, TP=1, DP=8, global batch 3072",
        f"text: roberta-base (transformers hub id, not in the Hugging Face cache ({tmp_path}): transformers downloads "
        "it when the ranks start, so every node needs the network, or download it first and name the folder; encoder "
        "and its MLM head when the checkpoint has one)",
        f"vision: {sources['unilm']} ({UNILM_DESCRIPTION})", FUSION_LINE]


def test_check_says_where_to_put_the_missing_beit_checkpoint(demo_world, tmp_path):
    result = check(demo_world, env={"HF_HUB_CACHE": str(tmp_path)})
    path = ROOT / "launchers" / "configs" / "pretrained" / "beitv2_base_patch16_224_pt1k.pth"
    assert result.returncode == 2
    assert f"error: model.init_vision_from: vision weights {path} do not exist." in result.stderr
    assert (f"download https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth "
            f"to {path}, or give a timm BEiT-v2 folder or weights file, or set model.init_vision_from: null to train "
            "the vision encoder from scratch") in result.stderr


# ---- a run that starts from them --------------------------------------------------------------------
def hf_hidden(folder: Path, ids, mask):
    from transformers import AutoModel

    with torch.no_grad():
        return AutoModel.from_pretrained(folder).eval()(input_ids=ids, attention_mask=mask).last_hidden_state


def hf_mlm_logits(folder: Path, ids, mask):
    from transformers import AutoModelForMaskedLM

    with torch.no_grad():
        return AutoModelForMaskedLM.from_pretrained(folder).eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.dist
def test_a_two_rank_run_starts_from_roberta_and_the_unilm_checkpoint(sources, demo_world, tmp_path):
    """TP=2: each rank holds half the heads of every block's copy of the shared table."""
    from engine_fixtures import run_config_dict
    from export_fixtures import random_pixels, random_text
    from harness import run_ranks

    raw = run_config_dict(demo_world, tmp_path / "run", steps=1, micro_batch=4, global_batch=4, tp=2)
    sets = [f"model.init_text_from={sources['roberta']}", f"model.init_vision_from={sources['unilm']}"]
    got = run_ranks(start_then_probe, 2, raw, sets)[0]
    assert got["layout"] == (2, 1)
    assert (got["init_text_from"], got["init_vision_from"]) == (str(sources["roberta"]), str(sources["unilm"]))
    vision = got["vision_config"]
    assert (vision["num_layers"], vision["hidden_size"], vision["num_heads"], vision["image_size"]) == (2, 64, 4, 32)

    ids, mask = random_text(VOCAB, pad_id=1)
    torch.testing.assert_close(got["text"], hf_hidden(sources["roberta"], ids, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(got["mlm_logits"], hf_mlm_logits(sources["roberta"], ids, mask), rtol=0, atol=1e-4)

    model, mask_token = sources["model"], sources["mask_token"]
    pixels = random_pixels(32)
    expected = reference_tokens(model, mask_token, pixels)
    with torch.no_grad():  # the reference computation is timm's own forward when nothing is masked
        torch.testing.assert_close(expected[:, 1:], model.forward_features(pixels)[:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["image"], expected, rtol=0, atol=1e-5)
    masked = reference_tokens(model, mask_token, pixels, mim_mask())
    torch.testing.assert_close(got["masked_image"], masked, rtol=0, atol=1e-5)
    # the imported mask token is what the masked patches carry: another token gives other outputs
    other = reference_tokens(model, torch.zeros_like(mask_token), pixels, mim_mask())
    assert (got["masked_image"] - other).abs().max() > 0.1
