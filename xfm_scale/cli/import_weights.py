#!/usr/bin/env python
"""Import pretrained encoders into an xfm weights folder a pre-training run starts from.

    python tools/import_weights.py --text roberta-base --vision pretrained/beitv2_base_patch16_224_pt1k.pth --preset base --out init/xfm

--text: a transformers BERT or RoBERTa folder (save_pretrained layout) or a hub id such as
roberta-base (transformers fetches it or reads its cache); its config decides layers, width, heads
and vocabulary. --vision: Microsoft unilm's BEiT-v2 pre-training checkpoint
(beitv2_base_patch16_224_pt1k.pth, the reference's; its sizes are read off its tensors, its shared
relative-position table is copied into every block and its mask token imported), a timm BEiT-v2
folder (config.json + model.safetensors, e.g. timm's save_for_hf or OUT/vision_encoder of
tools/export_weights.py) or a timm weights file of --vision-arch. Vision weights are checked key by
key: a missing, unexpected or misshapen encoder weight is refused, naming the keys (only the
allow-list of docs/checkpoints.md may be left out). The fusion encoder and heads come from
--preset. Start a run from it with the run config key ``model.init_from: init/xfm`` (the weights
are TP-sharded and ZeRO-3-partitioned at the run's layout), or skip this tool and name the sources
in the run config directly (``model.init_text_from``, ``model.init_vision_from``). Exit code 2: bad
input (the message says).
"""
import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    from xfm_scale import PRESETS, ConfigError
    from xfm_scale.interop import formats
    from xfm_scale.interop.pretrained import import_encoders

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=None, help="transformers BERT/RoBERTa folder or hub id")
    parser.add_argument("--vision", default=None, help="unilm BEiT-v2 .pth, timm BEiT-v2 folder or timm weights file")
    parser.add_argument("--vision-arch", default=formats.TIMM_ARCHITECTURE, help="timm architecture of a timm-layout --vision file")
    parser.add_argument("--preset", default="base", help=f"fusion encoder / heads from this preset ({', '.join(PRESETS)})")
    parser.add_argument("--out", required=True, help="the xfm weights folder to write")
    args = parser.parse_args(argv)
    try:
        folder = import_encoders(args.out, preset=args.preset, text=args.text, vision=args.vision,
                                 vision_architecture=args.vision_arch)
    except (ConfigError, OSError) as err:
        # ConfigError: a source that is not a complete BERT/RoBERTa or BEiT-v2 checkpoint (missing,
        # unexpected or misshapen weights, named; transformers' load failures are turned into it,
        # naming the file); OSError: unreadable input
        # or an --out that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
