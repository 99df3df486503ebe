#!/usr/bin/env python
"""Print a JSON with the parameter count of each encoder, the heads and the total of a preset.

    python tools/model_info.py --preset base
"""
import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    from xfm_scale import PRESETS, ConfigError, XFMConfig
    from xfm_scale import distributed
    from xfm_scale.model.info import parameter_counts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    args = parser.parse_args(argv)
    try:
        config = XFMConfig.from_preset(args.preset)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    distributed.initialize(tensor_parallel_size=1)
    counts = parameter_counts(config)
    print(json.dumps({"preset": args.preset, "parameters": counts}, indent=2))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
