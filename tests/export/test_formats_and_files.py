"""Single-process checks of the export / import conversions and files, on small models built
here: transformers' and timm's loaders against formats.py, pretrained.py's refusals of incomplete
sources, and export.py's handling of checkpoints it cannot read and of failures part way (a
synthetic ZeRO-3 checkpoint of one parameter). The multi-rank export of a trained run is in
test_export_and_reshard.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VOCAB, PADDED = 120, 128  # our vocabulary parameters carry padding rows


def run_tool(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """tools/NAME.py's main(argv) in this process (no interpreter start-up): (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(argv)
    return code, capsys.readouterr().err


def hf_masked_lm(flavour: str, layers: int = 2):
    import transformers

    cls = transformers.RobertaConfig if flavour == "roberta" else transformers.BertConfig
    cfg = cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(cfg)
    with torch.no_grad():  # a head that is not its initialisation (zeros, ones)
        for name, p in model.named_parameters():
            if name.startswith(("lm_head.", "cls.")) and p.dim() == 1:
                p.normal_(std=0.5)
    return model.eval()


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("flavour", ["roberta", "bert"])
def test_mlm_head_imports_and_exports_as_transformers_masked_lm(flavour, tmp_path):
    """A ...ForMaskedLM save read by the importer (encoder + MLM head, vocab padded as in our model),
    written back by the exporter's conversion: AutoModelForMaskedLM loads it with nothing missing or
    unexpected and gives the source's logits; AutoModel loads the encoder (only the pooler new)."""
    import transformers
    from safetensors.torch import save_file

    from xfm_scale.interop import formats
    from xfm_scale.model.tp_layout import fit_vocab_rows
    from xfm_scale.interop.pretrained import read_hf_text

    source = hf_masked_lm(flavour)
    source.save_pretrained(tmp_path / "source")
    cfg, read = read_hf_text(tmp_path / "source")
    ours = {name: fit_vocab_rows(name, read(name, "fp32"), PADDED) for name in read.names}
    assert {n for n in ours if n.startswith("text_mlm_head.")} == {
        f"text_mlm_head.{k}" for k in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias", "bias")}
    exported = {hf: t.contiguous() for name, tensor in ours.items()
                for hf, t in formats.text_model_to_hf(name, tensor, cfg)}
    (tmp_path / "export").mkdir()
    save_file(exported, str(tmp_path / "export" / "model.safetensors"), metadata={"format": "pt"})
    formats.text_config_to_hf(cfg).save_pretrained(tmp_path / "export")

    mlm, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    ids, mask = tokens()
    with torch.no_grad():
        torch.testing.assert_close(mlm.eval()(input_ids=ids, attention_mask=mask).logits,
                                   source(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    encoder, info = transformers.AutoModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert {k.split(".")[0] for k in info["missing_keys"]} <= {"pooler"}
    base = getattr(source, flavour)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   base(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=1e-5)


def test_import_of_a_bare_encoder_gives_no_mlm_head(tmp_path):
    from xfm_scale.interop.pretrained import read_hf_text

    hf_masked_lm("roberta").roberta.save_pretrained(tmp_path / "bare")
    _, read = read_hf_text(tmp_path / "bare")
    assert read.names and all(n.startswith("text.") for n in read.names)


def edited_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_import_refuses_weights_the_files_lack_or_hold_at_another_shape(tmp_path):
    """transformers initialises what the files lack at random and carries on; the import names it."""
    from xfm_scale.config import ConfigError
    from xfm_scale.interop.pretrained import read_hf_text

    hf_masked_lm("roberta", layers=2).save_pretrained(tmp_path / "two")
    three = edited_config(tmp_path / "two", num_hidden_layers=3)
    with pytest.raises(ConfigError, match=r"two: weights missing from its weight files: roberta\.encoder\.layer\.2\."):
        read_hf_text(three)
    hf_masked_lm("roberta").save_pretrained(tmp_path / "wide")
    wide = edited_config(tmp_path / "wide", intermediate_size=48)
    with pytest.raises(ConfigError, match=r"wide: weights of another shape than config\.json implies: "
                                          r"roberta\.encoder\.layer\.0\.intermediate\.dense\.bias \(64,\) \(config: \(48,\)\)"):
        read_hf_text(wide)


def test_import_tool_refuses_a_beit_file_of_another_architecture(tmp_path, capsys):
    """A weights file of other sizes than --vision-arch (e.g. BEiT-v2-L without --vision-arch):
    timm's strict load raises; the tool says which file and what to pass, and exits 2."""
    import timm
    from safetensors.torch import save_file

    beit = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             embed_dim=64, depth=1, num_heads=4)
    save_file(beit.state_dict(), str(tmp_path / "beit.safetensors"))
    code, err = run_tool("import_weights", ["--vision", str(tmp_path / "beit.safetensors"), "--preset", "tiny",
                                            "--out", str(tmp_path / "out")], capsys)  # a RuntimeError escaped
    assert code == 2, err
    assert f"error: {tmp_path / 'beit.safetensors'} does not hold the weights of timm's beitv2_base_patch16_224" in err
    assert "--vision-arch" in err and not (tmp_path / "out").exists()


# ---- vision encoder <-> timm -------------------------------------------------------------------------
def small_vision(**changes):
    from xfm_scale.config import VisionEncoderConfig

    return VisionEncoderConfig(**{**dict(num_layers=1, hidden_size=88, num_heads=4, ffn_hidden_size=176,
                                         image_size=16, patch_size=8), **changes})


def test_timm_rebuilds_the_mlp_width_exactly_and_the_export_refuses_what_timm_cannot_build():
    from timm.models.beit import Beit

    from xfm_scale.interop import formats
    from xfm_scale.config import ConfigError

    cfg = small_vision(ffn_hidden_size=120)  # 120 / 88 * 88 = 119.99999999999999: timm would build 119
    assert Beit(**formats.vision_model_args(cfg)).blocks[0].mlp.fc1.out_features == 120
    with pytest.raises(ConfigError, match=r"vision.layer_norm_eps=1e-05: timm's Beit uses 1e-06"):
        formats.vision_model_args(small_vision(layer_norm_eps=1e-5))


def test_a_timm_model_without_layer_scale_imports_unscaled():
    """No gammas in timm = gammas of 1.0 in ours (not BEiT-v2's 0.1 pre-training init)."""
    from timm.models.beit import Beit

    from xfm_scale.interop import formats

    plain = Beit(**{**formats.vision_model_args(small_vision()), "init_values": None}).eval()
    cfg = formats.vision_config_from_timm_model(plain)
    assert cfg.layer_scale_init == 1.0
    state = formats.vision_from_timm(plain.state_dict(), mask_token=None)
    scaled = Beit(**formats.vision_model_args(cfg)).eval()  # as exported: layer scale at cfg's value
    scaled.load_state_dict({n: t for k, v in state.items() for n, t in formats.vision_to_timm(k, v)})
    assert torch.equal(scaled.blocks[0].gamma_1, torch.ones(88))
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scaled.forward_features(pixels), plain.forward_features(pixels), rtol=0, atol=1e-6)


# ---- export of a synthetic checkpoint ----------------------------------------------------------------
def synthetic_checkpoint(root: Path, step: int, values: torch.Tensor, model_changes: dict | None = None) -> Path:
    """A ZeRO-3 tag folder of TP=1 x DP=1 as our trainer writes it, holding one parameter
    (``itm_head.weight``, 2 x 3) so that every export target can be written in a second."""
    from xfm_scale.checkpoint.writer import COMPLETE, tag_for
    from xfm_scale.config import XFMConfig

    model = XFMConfig.from_preset("tiny").to_dict()
    for key, value in (model_changes or {}).items():
        section, attr = key.split(".")
        model[section][attr] = value
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    meta = {"universal_checkpoint_info": {"tp_replicated_parameter_patterns": [],
                                          "parameter_with_row_parallelism_patterns": []},
            "model_config": model, "dp_world_size": 1, "mp_world_size": 1, "step": step,
            "ds_config": {"zero_optimization": {"stage": 3}}, "param_shapes": [{"itm_head.weight": [2, 3]}],
            "run_config": {"data": {"tokenizer_dir": str(root / "no-tokenizer")}}}
    torch.save(meta, folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"fp32_flat_groups": [values.float()]}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / COMPLETE).write_text("{}")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from xfm_scale.data.demo import train_tokenizer

    return train_tokenizer(["a cat on a mat", "two dogs in the park"], tmp_path_factory.mktemp("tokenizer"), 300)


def test_unreadable_nvme_offloaded_checkpoint_is_refused_before_anything_is_written(tmp_path, tokenizer, capsys):
    """DeepSpeed saves NVMe-swapped weights and Adam state under offloaded_tensors/ and leaves the
    partitions empty. Without the swap-file ids and global ranks that xfm_scale records in the
    client state (this synthetic checkpoint, or one an older xfm_scale saved), nothing says which
    file holds which partition: export says what to do instead, with exit code 2. The readable case
    is tests/engine/test_nvme_offload.py."""
    from xfm_scale.checkpoint.reader import CheckpointError, ZeroCheckpoint

    folder = synthetic_checkpoint(tmp_path / "checkpoints", 3, torch.empty(0))
    (folder / "offloaded_tensors" / "rank0").mkdir(parents=True)
    ck = ZeroCheckpoint(folder)  # its metadata stay readable: a resume at the saved layout needs them
    assert (ck.step, ck.tp, ck.dp) == (3, 1, 1)
    with pytest.raises(CheckpointError, match="offloaded to NVMe.*Resume it at its saved layout"):
        ck.full("itm_head.weight")
    code, err = run_tool("export_weights", ["--checkpoint", str(folder), "--out", str(tmp_path / "out"),
                                            "--tokenizer", str(tokenizer), "--no-progress"], capsys)
    assert code == 2, err
    assert err.startswith(f"error: {folder} was saved with the optimizer offloaded to NVMe") and "offloaded_tensors/" in err
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_the_previous_one_as_it_was(tmp_path, tokenizer):
    """A second export into the same folder that fails on its tokenizer (after the weights would
    have streamed) or on a vision config timm cannot represent: every file is still the first
    export's, and no temporary file is left."""
    from safetensors import safe_open

    from xfm_scale.config import ConfigError
    from xfm_scale.interop.export import export_checkpoint

    first = synthetic_checkpoint(tmp_path / "a", 3, torch.arange(6.0))
    export_checkpoint(first, tmp_path / "out", tokenizer_dir=tokenizer, progress=False)
    before = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert json.loads((tmp_path / "out" / "xfm" / "config.json").read_text())["step"] == 3
    with safe_open(str(tmp_path / "out" / "xfm" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("itm_head.weight"), torch.arange(6.0).view(2, 3))

    second = synthetic_checkpoint(tmp_path / "b", 5, torch.arange(6.0) + 1)
    not_a_tokenizer = tmp_path / "not_a_tokenizer"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "README").write_text("no tokenizer here")
    with pytest.raises(ConfigError, match="not_a_tokenizer is not a tokenizer folder transformers can load"):
        export_checkpoint(second, tmp_path / "out", tokenizer_dir=not_a_tokenizer, progress=False)
    third = synthetic_checkpoint(tmp_path / "c", 5, torch.arange(6.0) + 1, {"vision.layer_norm_eps": 1e-5})
    with pytest.raises(ConfigError, match="vision.layer_norm_eps"):
        export_checkpoint(third, tmp_path / "out", tokenizer_dir=tokenizer, progress=False)
    after = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before


def test_streaming_writer_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os

    from xfm_scale.interop import safetensors_stream

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(safetensors_stream.os, "fsync", lambda fd: events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(safetensors_stream.os, "replace", lambda a, b: events.append(("replace", str(b))) or
                        real_replace(a, b))
    path = tmp_path / "w.safetensors"
    writer = safetensors_stream.StreamingSafetensorsWriter(path, [("x", (2,), torch.float32)])
    writer.write("x", torch.ones(2))
    writer.publish()
    assert events == [("fsync", str(tmp_path / "w.safetensors.partial")), ("replace", str(path)),
                      ("fsync", str(tmp_path))]
