"""The sweep's result tables: one row per finished run (its grid values and final metrics), written
as ``OUTPUT_ROOT/results.csv`` and ``OUTPUT_ROOT/results.md``.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from xfm_scale.launch.sweep.spec import Run, SweepSpec, expand, value_label

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"


def collect_results(spec: SweepSpec, runs: list[Run] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: one row per finished run (sorted by name) with ``run``, its grid values and
    every key of its final_metrics.json; columns are run, grid keys, then the metrics' union, sorted."""
    rows = []
    for run in sorted(runs if runs is not None else expand(spec), key=lambda r: r.name):
        if (row := _row(run)) is not None:
            rows.append(row)
    metric_keys = sorted({k for row in rows for k in row} - {"run", *spec.grid})
    return ["run", *spec.grid, *metric_keys], rows


def _row(run: Run) -> dict[str, Any] | None:
    """``run``'s row; None when it has not finished (or its final metrics are not a JSON object)."""
    if not run.finished:
        return None
    try:
        metrics = json.loads(run.folder.final_metrics.read_text())
    except json.JSONDecodeError:
        return None  # a run killed while writing it; it is not finished in any useful sense
    if not isinstance(metrics, dict):
        return None
    return {"run": run.name, **run.values, **{k: v for k, v in metrics.items() if k not in run.values}}


def write_results(spec: SweepSpec, runs: list[Run] | None = None) -> tuple[Path, Path]:
    """Write OUTPUT_ROOT/results.csv and results.md (a markdown table; missing values blank)."""
    columns, rows = collect_results(spec, runs)
    csv_path, md_path = spec.output_root / RESULTS_CSV, spec.output_root / RESULTS_MD
    csv_path.write_text(_csv_table(columns, rows))
    md_path.write_text(f"Sweep `{spec.path}`: {len(rows)} finished run(s).\n\n" + _md_table(columns, rows))
    return csv_path, md_path


def _csv_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_csv_cell(row.get(c)) for c in columns] for row in rows])
    return buffer.getvalue()


def _md_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv_cell(value: Any) -> str:
    return "" if value is None else value_label(value)


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value_label(value).replace("|", "\\|")
