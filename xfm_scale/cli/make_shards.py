#!/usr/bin/env python
r"""Convert a raw corpus to webdataset tar shards + a manifest (xfm_scale.data.shards).

  python tools/make_shards.py --modality text  --input wiki.jsonl      --out shards/wiki --name wiki
  python tools/make_shards.py --modality image --input imagenet/train  --out shards/in1k --name in1k
  python tools/make_shards.py --modality pair  --input captions_train2017.json --image-root coco/train2017 \
      --out shards/coco --name coco
  python tools/make_shards.py --modality pair  --input captions_train2017.json --image-root coco/train2017 \
      --out shards/coco1 --name coco1 --captions all

--captions per-sample (default) writes one sample per caption, so an image with 5 captions is 5
samples; --captions all writes one sample per image: KEY.txt holds its first caption and
KEY.captions.json the JSON list of all of them, which the loader draws one from per read with
data.caption_choice: draw (docs/data.md). An image with one caption is KEY.txt alone either way.

Skipped records are counted per reason in the manifest and printed, the first few of each reason
named. Shards that exist already (img2dataset's output, any webdataset tar) need no conversion:
name them by pattern in the blend spec (shards: "web/{00000..00099}.tar"). Exit code 2 on invalid
input, or when no record could be read (nothing is written then).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tarfile
from pathlib import Path

from xfm_scale.data.shards import DataSpecError, Skip, SkipCounter, write_corpus
from xfm_scale.data.sources import CAPTION_LIST_EXT, CAPTION_MODES, read_images, read_pairs, read_text

# What each skip reason means, and the option to look at when a whole corpus is skipped for it.
REASONS = {
    "missing_image_file": "image files not found: image paths are read relative to --image-root{root}",
    "missing_field": "records without the field named by {field_option}",
    "empty_caption": "records with no caption (the caption is read from --caption-field '{caption}')",
    "empty_text": "empty texts or lines",
    "bad_json": "lines that are not JSON objects",
    "bad_utf8": "lines that are not UTF-8",
    "bad_image": "images PIL cannot decode (corrupt, or not an image)",
    "bad_base64": "inline images that are not valid base64",
}
OPTIONS = {"text": "--text-field", "image": "--input", "pair": "--image-root, --image-field, --caption-field"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True, choices=["text", "image", "pair"])
    p.add_argument("--input", required=True, help="jsonl/txt (text), folder or list file (image), "
                   "jsonl/json/tsv/COCO captions json (pair); not shards: a spec names those directly")
    p.add_argument("--out", required=True, help="output folder for NAME-000000.tar ... and NAME.manifest.json")
    p.add_argument("--name", required=True, help="corpus name (used in the blend spec and sample keys)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (text corpora)")
    p.add_argument("--image-field", default="image", help="field/column with the image path "
                   "(FIELD_base64 for inline bytes)")
    p.add_argument("--caption-field", default="caption", help="field/column with the caption (pairs)")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the input's)")
    p.add_argument("--captions", default="per-sample", choices=CAPTION_MODES,
                   help="pairs: an image's several captions as one sample per caption (per-sample, default) or "
                   f"one sample per image holding them all (all: KEY.txt the first, KEY.{CAPTION_LIST_EXT} the list)")
    p.add_argument("--maxcount", type=int, default=10_000, help="samples per shard")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard")
    args = p.parse_args(argv)
    source = Path(args.input)
    try:
        _check_input(source, args)
        if args.captions != "per-sample" and args.modality != "pair":
            raise DataSpecError(f"corpus '{args.name}': --captions {args.captions} is for --modality pair only")
        if args.modality == "text":
            records = read_text(source, text_field=args.text_field)
        elif args.modality == "image":
            records = read_images(source)
        else:
            records = read_pairs(source, image_root=args.image_root, image_field=args.image_field,
                                 caption_field=args.caption_field, captions=args.captions)
        # Up to the first good record before anything is written: a corpus with none (a wrong
        # --image-root or field name) must neither leave an empty manifest behind nor delete the
        # corpus's previous shards.
        head = _until_first_sample(iter(records))
        if not head or isinstance(head[-1], Skip):
            skipped = SkipCounter()
            for skip in head:
                skipped.add(skip)
            raise DataSpecError(_nothing_read(args, source, skipped))
        with_list = [0]  # samples written with a caption list
        result = write_corpus(_count_lists(itertools.chain(head, records), with_list), out_dir=args.out,
                              name=args.name, modality=args.modality, maxcount=args.maxcount, maxsize=args.maxsize,
                              source=str(source))
    except DataSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{r}={n}" for r, n in sorted(result.skipped.items())) or "none"
    print(f"{args.name}: wrote {result.num_samples} samples; skipped: {skipped}")
    if args.captions == "all":
        print(f"  {with_list[0]} samples hold several captions (KEY.{CAPTION_LIST_EXT}; KEY.txt is the first), "
              f"{result.num_samples - with_list[0]} one (KEY.txt)")
    for line in _reason_lines(args, result.skipped, result.skipped_examples):
        print(line)
    print(f"manifest: {result.manifest_path}")
    return 0


def _check_input(source: Path, args) -> None:
    """Refuse inputs that are not raw corpora, naming what to do instead."""
    if not source.exists():
        raise DataSpecError(f"corpus '{args.name}': input {source} does not exist; fix --input")
    tars = sorted(source.glob("*.tar")) if source.is_dir() else [source] if _is_tar(source) else []
    images = source.is_dir() and args.modality == "image" and next(read_images(source), None) is not None
    if tars and not images:
        pattern = f"{tars[0].parent}/*.tar" if source.is_dir() else str(source)
        what = "holds webdataset tar shards" if source.is_dir() else "is a webdataset tar shard"
        raise DataSpecError(
            f"corpus '{args.name}': --input {source} {what} "
            f"already (img2dataset's output, or shards written before), which need no conversion: point the blend "
            f"spec at the shards, e.g. {{name: {args.name}, modality: {args.modality}, shards: \"{pattern}\", "
            "weight: 1}")
    if source.is_dir() and args.modality != "image":
        what = "a .jsonl or text file" if args.modality == "text" else \
            "the captions file (.jsonl/.json/.tsv/COCO captions) and --image-root its image folder"
        raise DataSpecError(f"corpus '{args.name}': --input {source} is a folder; for --modality {args.modality} "
                            f"give {what}")


def _is_tar(path: Path) -> bool:
    if path.suffix == ".tar":
        return True
    try:
        return path.is_file() and tarfile.is_tarfile(path)
    except OSError:
        return False


def _count_lists(records, count: list[int]):
    """``records`` unchanged, counting in ``count[0]`` the samples that hold a caption list."""
    for record in records:
        if isinstance(record, dict) and CAPTION_LIST_EXT in record:
            count[0] += 1
        yield record


def _until_first_sample(records) -> list:
    head = []
    for record in records:
        head.append(record)
        if not isinstance(record, Skip):
            break
    return head


def _nothing_read(args, source: Path, skipped: SkipCounter) -> str:
    counts = ", ".join(f"{r}={n}" for r, n in sorted(skipped.counts.items())) or "no records at all"
    lines = [f"corpus '{args.name}': no sample could be read from {source} ({counts}); nothing was written. "
             f"Check the format options ({OPTIONS[args.modality]}):"]
    lines += _reason_lines(args, dict(skipped.counts), skipped.examples)
    return "\n".join(lines)


def _reason_lines(args, counts: dict[str, int], examples: dict[str, list[str]]) -> list[str]:
    """One line per skip reason: what it means (naming the option to check) and the first records."""
    field_option = f"--text-field '{args.text_field}'" if args.modality == "text" else \
        f"--image-field '{args.image_field}' (or '{args.image_field}_base64')"
    root = f" {args.image_root}" if args.image_root else ", by default the input's folder"
    lines = []
    for reason, n in sorted(counts.items()):
        meaning = REASONS.get(reason, reason).format(root=root, field_option=field_option, caption=args.caption_field)
        named = examples.get(reason, [])
        lines.append(f"  {reason}={n}: {meaning}" + (f"; e.g. {', '.join(named)}" if named else ""))
    return lines


if __name__ == "__main__":
    sys.exit(main())
