"""tools/train_tokenizer.py: a tokenizer from your own texts, captions and shards, offline; bad
input refused with exit code 2, nothing written."""
from __future__ import annotations

import pytest

from owndata_fixtures import write_coco, write_img2dataset, write_text
from xfm_scale.cli.train_tokenizer import main as train_tokenizer

pytestmark = pytest.mark.unit


def test_train_tokenizer_on_text_captions_and_shards(tmp_path, capsys):
    text = write_text(tmp_path / "text.txt", n=30)
    captions, _ = write_coco(tmp_path / "coco", n_images=3)
    write_img2dataset(tmp_path / "web", shards=1, per_shard=4)
    code = train_tokenizer(["--input", str(text), "--captions", str(captions), "--shards", str(tmp_path / "web/*.tar"),
                            "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    assert code == 0
    # 30 lines + 6 COCO captions + 4 web captions; the vocabulary reaches the size asked for
    assert capsys.readouterr().out == f"tokenizer: 300 tokens, trained on 40 texts; data.tokenizer_dir: {tmp_path / 'tok'}\n"
    from xfm_scale.data.loader import load_tokenizer

    tok = load_tokenizer(tmp_path / "tok")  # what the trainer loads: mask and pad tokens present
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 4)
    assert len(tok) == 300
    ids = tok("a purple photo from the web")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tok.decode(ids[1:-1]) == "a purple photo from the web"
    assert len(ids) < len("a purple photo from the web") + 2  # merges learnt: not one token per byte


@pytest.mark.parametrize("args, message", [
    (["--vocab-size", "100"], "error: --vocab-size 100 is too small: the 5 special tokens and 256 byte symbols come "
                              "first; give at least 262\n"),
    (["--input", "{web}/00000.tar"], "error: --input {web}/00000.tar: --input reads plain text lines or .jsonl; "
                                     "give a .tar file with --shards\n"),
    (["--input", "{tmp}/caps.json"], "error: --input {tmp}/caps.json: --input reads plain text lines or .jsonl; "
                                     "give a .json file with --captions\n"),
    (["--shards", "{tmp}/none-*.tar"], "error: --shards '{tmp}/none-*.tar' matches no file; fix the pattern\n"),
    (["--input", "{tmp}/empty.txt"], "error: no text in {tmp}/empty.txt; check the files and --text-field / "
                                     "--caption-field\n"),
    ([], "error: give the text to train on: --input FILE, --captions FILE and/or --shards PATTERN\n"),
])
def test_train_tokenizer_refuses_bad_input_and_writes_nothing(tmp_path, capsys, args, message):
    write_img2dataset(tmp_path / "web", shards=1, per_shard=2)
    (tmp_path / "caps.json").write_text("[]")
    (tmp_path / "empty.txt").write_text("\n  \n")
    fill = {"web": tmp_path / "web", "tmp": tmp_path}
    args = [a.format(**fill) for a in args]
    if "--vocab-size" in args:
        args += ["--input", str(write_text(tmp_path / "t.txt", n=3))]
    assert train_tokenizer([*args, "--out", str(tmp_path / "tok")]) == 2
    assert capsys.readouterr().err == message.format(**fill)
    assert not (tmp_path / "tok").exists()
