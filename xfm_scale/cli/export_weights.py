#!/usr/bin/env python
"""Export a training checkpoint (any DP x TP) as merged weights for downstream users.

    python tools/export_weights.py --checkpoint runs/demo/checkpoints [--tag step00000800] --out export/ [--dtype bf16]

--checkpoint is the trainer's OUTPUT/checkpoints folder (the latest complete checkpoint, or --tag)
or one tag folder. Writes OUT/xfm (whole model, for xfm_scale at any TP size), OUT/text_encoder
(transformers RoBERTa/BERT with tokenizer) and OUT/vision_encoder (timm BEiT-v2). See
xfm_scale/export.py. Exit code 2: the checkpoint, an argument or the output folder is wrong (the
message names it); a previous export in --out is then left as it was.
"""
import argparse
import logging
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    from xfm_scale.config import ConfigError
    from xfm_scale.interop.export import DTYPES, export_checkpoint
    from xfm_scale.checkpoint.reader import CheckpointError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="OUTPUT/checkpoints folder or one tag folder")
    parser.add_argument("--tag", default=None, help="a tag folder name such as step00000800 (default: latest complete)")
    parser.add_argument("--out", required=True, help="output folder (xfm/, text_encoder/, vision_encoder/ inside)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run config's data.tokenizer_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        folders = export_checkpoint(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype,
                                    tokenizer_dir=args.tokenizer, progress=not args.no_progress)
    except (CheckpointError, ConfigError, OSError) as err:
        # CheckpointError: the checkpoint (unfinished, incomplete, NVMe-offloaded, not ours);
        # ConfigError: the tokenizer, or a model config timm cannot represent; OSError: a missing
        # folder, or --out that cannot be written (permissions, disk full)
        print(f"error: {err}", file=sys.stderr)
        return 2
    for kind, folder in folders.items():
        print(f"{kind}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
