"""Dated rows in benchmarks/RESULTS.md, with the machine and package versions they were measured on."""
from __future__ import annotations

import datetime
import os
import platform
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("# Benchmark results\n\nOne dated row per run; rows are only added. Each row names its script.\n\n"
          "| date | script / benchmark | hardware | versions | result |\n|---|---|---|---|---|\n")


def hardware() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}"


def versions(pkgs: tuple[str, ...]) -> str:
    return f"py {platform.python_version()}, " + ", ".join(f"{p} {version(p)}" for p in pkgs)


def commit() -> str:
    """The checkout's commit (with ``+`` when the tree has changes), or "" outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=RESULTS.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty else "")


def add_row(benchmark: str, result: str, pkgs: tuple[str, ...]) -> None:
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    at = commit()
    with open(RESULTS, "a") as f:
        f.write(f"| {datetime.date.today()} | {benchmark}{f' @ {at}' if at else ''} | {hardware()} | "
                f"{versions(pkgs)} | {result} |\n")
