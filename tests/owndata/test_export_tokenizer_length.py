"""The exported tokenizer takes no more tokens than the exported text encoder has positions:
`tok(long_text, truncation=True)` then feeds transformers' model without an index error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xfm_scale.config import TextEncoderConfig
from xfm_scale.interop.export import export_checkpoint, max_text_tokens

pytestmark = pytest.mark.unit
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"
LONG = "a red square on the left of two blue circles " * 40


def test_the_exported_tokenizer_truncates_to_the_encoders_positions(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(FIXTURE / "tokenizer"))
    assert source.model_max_length == 512 and len(source(LONG, truncation=True)["input_ids"]) > 40  # would not fit
    folders = export_checkpoint(FIXTURE / "checkpoints", tmp_path / "export", progress=False,
                                tokenizer_dir=FIXTURE / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(folders["text_encoder"]))
    model = AutoModelForMaskedLM.from_pretrained(str(folders["text_encoder"])).eval()
    assert model.config.max_position_embeddings == 40 and tok.model_max_length == 38  # RoBERTa: pad id 1 + 1 offset
    batch = tok([LONG, "short"], truncation=True, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 38)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 38, len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("flavour, pad, positions, expected", [("roberta", 1, 514, 512), ("roberta", 1, 40, 38),
                                                               ("bert", 0, 512, 512)])
def test_max_text_tokens(flavour, pad, positions, expected):
    text = TextEncoderConfig(num_layers=1, hidden_size=8, num_heads=1, ffn_hidden_size=8, vocab_size=10,
                             max_position_embeddings=positions, pad_token_id=pad, flavour=flavour)
    assert max_text_tokens(text) == expected
