#!/usr/bin/env python
"""Set up (and record in the cache) a weighted, deterministic blend of corpora and report it.

  python tools/blend_data.py SPEC.yaml --num-samples 10000000 --out DIR [--seed S]
  python tools/blend_data.py --data-path "0.7 shards/coco/coco.manifest.json 0.3 shards/wiki/wiki-{000000..000031}.tar" \
      --num-samples 1000000 --out DIR

The blend is computed per position (xfm_scale.data.blend): nothing is built per sample, so any N
(10 billion included) takes the time of validating the corpora. Records the blend in
DIR/blend-<hash>/blend.json (a few kB; a second run with the same spec, shards, N and seed is a
cache hit) and the per-corpus table, realized shares from the closed-form counts and each corpus's
largest deviation from weight x n at any prefix, in DIR/report.json. Names blend folders of the
old per-sample format (version 1) found in DIR, which nothing reads any more. Exit code 2 on
invalid input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from xfm_scale.data.blend import build_blend, format_report, stale_caches
from xfm_scale.data.shards import DataSpecError, verify_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="YAML blend spec")
    p.add_argument("--data-path", help='Megatron form "w1 p1 w2 p2" (paths: manifests or shard patterns)')
    p.add_argument("--num-samples", type=int, required=True, help="length of the global sample sequence")
    p.add_argument("--out", required=True, help="cache folder of blends; report.json goes here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify-checksums", action="store_true", help="recompute every manifest shard's sha256")
    args = p.parse_args(argv)
    if (args.spec is None) == (args.data_path is None):
        print("error: give a SPEC.yaml or --data-path (exactly one)", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        start = time.perf_counter()
        blend = build_blend(args.spec, num_samples=args.num_samples, seed=args.seed, cache_dir=out,
                            data_path=args.data_path)
        elapsed = time.perf_counter() - start
        if args.verify_checksums:
            _verify(args.spec)
    except DataSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = blend.report()
    print(format_report(rows))
    status = "cache hit" if blend.cache_hit else "recorded"
    print(f"{status}: {blend.num_samples:,} samples, seed {blend.seed}, in {elapsed:.2f}s -> {blend.path}")
    stale = stale_caches(out)
    if stale:
        print(f"note: {len(stale)} blend folder(s) of the old per-sample format in {out} are not read any more "
              f"(delete them): {', '.join(p.name for p in stale)}")
    report = {"fingerprint": blend.fingerprint, "num_samples": blend.num_samples, "seed": blend.seed,
              "cache_hit": blend.cache_hit, "path": str(blend.path), "seconds": round(elapsed, 3),
              "tree": repr(blend.tree.shape), "corpora": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


def _verify(spec_path: str | None) -> None:
    from xfm_scale.data.spec import load_spec

    if spec_path is None:
        return
    specs, root = load_spec(spec_path)
    for s in specs:
        if s.manifest:
            bad = verify_manifest(root / s.manifest)
            if bad:
                raise DataSpecError(f"corpus '{s.name}': shards {bad} do not match their manifest checksum; "
                                    "rebuild them with tools/make_shards.py")


if __name__ == "__main__":
    sys.exit(main())
