#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on your own text, offline, for data.tokenizer_dir.

  python tools/train_tokenizer.py --input text.txt --out tokenizer
  python tools/train_tokenizer.py --input wiki.jsonl --text-field text \\
      --captions captions_train2017.json --shards "web/{00000..00099}.tar" --vocab-size 8000 --out tokenizer

The tokenizer is the demo's (xfm_scale.data.demo.train_tokenizer): byte-level BPE with RoBERTa's
special tokens (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), saved as a transformers tokenizer folder
(AutoTokenizer.from_pretrained(OUT)). It is trained on every --input text (plain lines, or a .jsonl
field), every --captions caption (jsonl/json/tsv/COCO captions; no image is read) and the .txt
members of --shards (webdataset or img2dataset shards). Any local transformers tokenizer folder
with mask and pad tokens (a roberta-base download) works instead.
Exit code 2 on invalid input.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import sys
import tarfile
from pathlib import Path

from xfm_scale.data.shards import DataSpecError, Skip

SPECIAL_TOKENS = 5
BYTE_ALPHABET = 256
MIN_VOCAB = SPECIAL_TOKENS + BYTE_ALPHABET + 1
"""The special tokens and the 256 byte symbols come first: a vocabulary must hold more."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", default=[], metavar="FILE",
                   help="text file: one text per line, or .jsonl with --text-field (repeatable)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text")
    p.add_argument("--captions", action="append", default=[], metavar="FILE",
                   help="pair source whose captions are trained on too: jsonl/json/tsv/COCO captions (repeatable)")
    p.add_argument("--caption-field", default="caption", help="field/column with the caption")
    p.add_argument("--shards", action="append", default=[], metavar="PATTERN",
                   help='webdataset shards whose .txt members are trained on, e.g. "web/{00000..00009}.tar" '
                        "(repeatable)")
    p.add_argument("--vocab-size", type=int, default=8000, help=f"tokens (at least {MIN_VOCAB})")
    p.add_argument("--out", required=True, help="output folder (data.tokenizer_dir)")
    args = p.parse_args(argv)
    counted = {"texts": 0}
    try:
        _check(args)
        texts = _texts(args, counted)
        first = next(texts, None)  # before anything is written
        if first is None:
            raise DataSpecError(f"no text in {', '.join(args.input + args.captions + args.shards)}; check the "
                                "files and --text-field / --caption-field")
        from xfm_scale.data.demo import train_tokenizer

        out = train_tokenizer(itertools.chain([first], texts), Path(args.out), args.vocab_size)
    except DataSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(out), local_files_only=True))
    print(f"tokenizer: {size} tokens, trained on {counted['texts']} texts; data.tokenizer_dir: {out}")
    return 0


def _check(args) -> None:
    if not args.input and not args.captions and not args.shards:
        raise DataSpecError("give the text to train on: --input FILE, --captions FILE and/or --shards PATTERN")
    if args.vocab_size < MIN_VOCAB:
        raise DataSpecError(f"--vocab-size {args.vocab_size} is too small: the {SPECIAL_TOKENS} special tokens and "
                            f"{BYTE_ALPHABET} byte symbols come first; give at least {MIN_VOCAB}")
    for path in map(Path, args.input + args.captions):
        if not path.is_file():
            raise DataSpecError(f"{path} is not a file; fix --input / --captions")
    for path in map(Path, args.input):
        if path.suffix in (".json", ".tsv", ".tar"):
            option = "--shards" if path.suffix == ".tar" else "--captions"
            raise DataSpecError(f"--input {path}: --input reads plain text lines or .jsonl; give a {path.suffix} "
                                f"file with {option}")
    for pattern in args.shards:
        _shard_paths(pattern)  # raises when it matches nothing


def _texts(args, counted: dict[str, int]):
    """Every text and caption, counted into ``counted`` as the trainer reads them."""
    from xfm_scale.data.sources import read_captions, read_text

    for path in args.input:
        for record in read_text(path, text_field=args.text_field):
            if not isinstance(record, Skip):
                counted["texts"] += 1
                yield record["txt"]
    for path in args.captions:
        for caption in read_captions(path, caption_field=args.caption_field):
            counted["texts"] += 1
            yield caption
    for pattern in args.shards:
        for shard in _shard_paths(pattern):
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if info.isfile() and info.name.endswith(".txt"):
                        text = tar.extractfile(info).read().decode("utf-8", errors="replace").strip()
                        if text:
                            counted["texts"] += 1
                            yield text


def _shard_paths(pattern: str) -> list[str]:
    import braceexpand

    paths = [p for item in braceexpand.braceexpand(pattern)
             for p in (sorted(glob.glob(item)) if glob.has_magic(item) else [item]) if Path(p).is_file()]
    if not paths:
        raise DataSpecError(f"--shards {pattern!r} matches no file; fix the pattern")
    return paths


if __name__ == "__main__":
    sys.exit(main())
