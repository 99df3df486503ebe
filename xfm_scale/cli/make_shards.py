#!/usr/bin/env python
"""Convert a raw corpus to webdataset tar shards + a manifest (xfm_scale.data.shards).

  python tools/make_shards.py --modality text  --input wiki.jsonl      --out shards/wiki --name wiki
  python tools/make_shards.py --modality image --input imagenet/train  --out shards/in1k --name in1k
  python tools/make_shards.py --modality pair  --input captions_train2017.json --image-root coco/train2017 \
      --out shards/coco --name coco

Skipped records are counted per reason in the manifest and printed. Exit code 2 on invalid input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xfm_scale.data.shards import DataSpecError, write_corpus
from xfm_scale.data.sources import read_images, read_pairs, read_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True, choices=["text", "image", "pair"])
    p.add_argument("--input", required=True, help="jsonl/txt (text), folder or list file (image), "
                   "jsonl/json/tsv/COCO captions json (pair)")
    p.add_argument("--out", required=True, help="output folder for NAME-000000.tar ... and NAME.manifest.json")
    p.add_argument("--name", required=True, help="corpus name (used in the blend spec and sample keys)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (text corpora)")
    p.add_argument("--image-field", default="image", help="field/column with the image path "
                   "(FIELD_base64 for inline bytes)")
    p.add_argument("--caption-field", default="caption")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the input's)")
    p.add_argument("--maxcount", type=int, default=10_000, help="samples per shard")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard")
    args = p.parse_args(argv)
    source = Path(args.input)
    try:
        if not source.exists():
            raise DataSpecError(f"corpus '{args.name}': input {source} does not exist; fix --input")
        if args.modality == "text":
            records = read_text(source, text_field=args.text_field)
        elif args.modality == "image":
            records = read_images(source)
        else:
            records = read_pairs(source, image_root=args.image_root, image_field=args.image_field,
                                 caption_field=args.caption_field)
        result = write_corpus(records, out_dir=args.out, name=args.name, modality=args.modality,
                              maxcount=args.maxcount, maxsize=args.maxsize, source=str(source))
    except DataSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{r}={n}" for r, n in sorted(result.skipped.items())) or "none"
    print(f"{args.name}: wrote {result.num_samples} samples; skipped: {skipped}")
    print(f"manifest: {result.manifest_path}")
    if result.num_samples == 0:
        print(f"error: corpus '{args.name}': no sample could be read from {source}; check the format options",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
