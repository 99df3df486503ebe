#!/usr/bin/env python
"""Run a grid of pre-training runs, one after another (or N at a time), resumably.

  python launchers/sweep.py SWEEP.yaml [--dry-run] [--max-parallel N] [--retry-failed]

SWEEP.yaml names a base run config, a grid (dotted key -> list of values; every combination is a
run), fixed overrides, an output root and the launch command (see launchers/sweeps/example.yaml and
xfm_scale/launch/sweep/). Each run writes OUTPUT_ROOT/<run name>/ (run.log, metrics.jsonl,
final_metrics.json). Finished runs (final_metrics.json present) are skipped, so running the same
sweep again resumes it; failed runs are recorded in OUTPUT_ROOT/sweep_state.json and re-run only with
--retry-failed. At the end OUTPUT_ROOT/results.csv and results.md list every finished run.

Exit code: 0 every launchable run finished, 1 some run failed (or failed before and was not retried),
2 invalid input (the sweep file, or no run can launch), 130 interrupted (run it again to resume).
"""
from __future__ import annotations

import argparse
import sys

from xfm_scale.launch.sweep import SweepBusy, SweepError, load_sweep, run_sweep


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (YAML)")
    p.add_argument("--dry-run", action="store_true", help="print each run's status and command; launch nothing")
    p.add_argument("--max-parallel", type=_positive, default=1,
                   help="runs at a time (default 1; more only when the command places runs on separate "
                        "GPUs or nodes, e.g. through srun)")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before")
    args = p.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
        report = run_sweep(spec, max_parallel=args.max_parallel, retry_failed=args.retry_failed,
                           dry_run=args.dry_run, env=env, log=lambda line: print(line, flush=True))
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SweepBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished runs are kept)", file=sys.stderr)
        return 130
    launchable = len(report.planned) + len(report.already_finished) + len(report.skipped_failed)
    if report.invalid and launchable == 0:
        print(f"error: no run of {args.sweep} can launch (reasons above); fix the sweep or base config",
              file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"results: {spec.output_root / 'results.csv'}, {spec.output_root / 'results.md'}")
    if not report.complete:
        print(f"incomplete: {len(report.failed)} failed now, {len(report.skipped_failed)} failed before "
              f"(--retry-failed runs them again)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
