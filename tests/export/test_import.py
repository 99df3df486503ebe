"""Import of pretrained encoders saved offline (randomly initialised transformers BERT and RoBERTa
of different sizes, a timm BEiT-v2) into a TP=2 x DP=1 ZeRO-3 model: its encoders reproduce the
sources' hidden states, and RoBERTa's MLM head its logits. RoBERTa + BEiT go through
tools/import_weights.py and ``model.init_from``; BERT through the run config's
``model.init_text_from``."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_fixtures import run_config_dict
from export_fixtures import build_then_probe, random_pixels, random_text, train_then_probe
from harness import run_ranks, tool_env

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
VOCAB = 500  # the demo tokenizer (438 tokens) fits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    import timm
    import transformers
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    roberta = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                                         intermediate_size=192, max_position_embeddings=64, type_vocab_size=1)
    bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=256, max_position_embeddings=48, type_vocab_size=2)
    # RoBERTa with its MLM head (as roberta-base is saved), BERT as a bare encoder (no head to import)
    roberta_mlm = transformers.AutoModelForMaskedLM.from_config(roberta)
    with torch.no_grad():  # a head that is not its initialisation (zero bias, unit LayerNorm)
        for p in (roberta_mlm.lm_head.bias, roberta_mlm.lm_head.layer_norm.weight, roberta_mlm.lm_head.layer_norm.bias):
            p.normal_(std=0.5)
    roberta_mlm.save_pretrained(root / "roberta")
    transformers.AutoModel.from_config(bert).save_pretrained(root / "bert")
    beit = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             embed_dim=64, depth=2, num_heads=4, init_values=0.2)
    with torch.no_grad():  # non-trivial biases and relative position tables
        for name, p in beit.named_parameters():
            if name.endswith(("bias", "bias_table")):
                p.normal_(std=0.05)
    save_for_hf(beit, root / "beit", model_args={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                                                 "num_heads": 4, "init_values": 0.2, "num_classes": 0})
    return root


def hf_hidden(folder: Path, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def hf_mlm_logits(folder: Path, ids, mask):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def test_roberta_and_beit_through_the_import_tool_into_a_tp2_model(sources, demo_world, tmp_path):
    import timm

    out = tmp_path / "init" / "xfm"
    result = subprocess.run([sys.executable, str(ROOT / "tools/import_weights.py"), "--text", str(sources / "roberta"),
                             "--vision", str(sources / "beit"), "--preset", "tiny", "--out", str(out)],
                            capture_output=True, text=True, env=tool_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    raw = run_config_dict(demo_world, tmp_path / "run", steps=1, micro_batch=4, global_batch=4, tp=2)
    raw["data"]["eval_manifest"] = str(demo_world.eval_manifest)
    raw["model"]["init_from"] = str(out)
    got = run_ranks(build_then_probe, 2, raw)[0]
    assert got["layout"] == (2, 1)
    ids, mask = random_text(VOCAB, pad_id=1)
    torch.testing.assert_close(got["text"], hf_hidden(sources / "roberta", ids, mask), rtol=0, atol=1e-5)
    # the pretrained MLM head was imported too (the method starts text_mlm_head from roberta-base's)
    torch.testing.assert_close(got["mlm_logits"], hf_mlm_logits(sources / "roberta", ids, mask), rtol=0, atol=1e-4)
    beit = timm.create_model(f"local-dir:{sources / 'beit'}", pretrained=True).eval()
    with torch.no_grad():
        tokens = beit.forward_features(random_pixels(32))
        pooled = beit.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(got["image"][:, 1:], tokens[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["image"][:, 0], pooled, rtol=0, atol=1e-5)


def test_bert_named_in_the_run_config_into_a_tp2_model_and_the_run_resumes(sources, demo_world, tmp_path):
    """The BERT sizes (flavour, 2 token types, 48 positions, 500 tokens) come from the import; the
    relaunched run rebuilds that model from its checkpoint, not from the preset."""
    raw = run_config_dict(demo_world, tmp_path / "run", steps=1, micro_batch=4, global_batch=4, tp=2)
    raw["data"]["eval_manifest"] = str(demo_world.eval_manifest)
    raw["model"]["init_text_from"] = str(sources / "bert")
    got = run_ranks(build_then_probe, 2, copy.deepcopy(raw))[0]
    ids, mask = random_text(VOCAB, pad_id=0)
    torch.testing.assert_close(got["text"], hf_hidden(sources / "bert", ids, mask), rtol=0, atol=1e-5)
    trained = run_ranks(train_then_probe, 2, copy.deepcopy(raw))[0]
    resumed = run_ranks(build_then_probe, 2, copy.deepcopy(raw))[0]
    assert resumed["resumed_at"] == 1
    torch.testing.assert_close(resumed["text"], trained["text"], rtol=0, atol=0)


def test_import_refuses_a_non_bert_model(sources, tmp_path):
    import transformers

    gpt = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt)
    result = subprocess.run([sys.executable, str(ROOT / "tools/import_weights.py"), "--text", str(gpt),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=tool_env(), timeout=300)
    assert result.returncode == 2
    assert "model_type 'gpt2': the language encoder imports BERT or RoBERTa checkpoints" in result.stderr
