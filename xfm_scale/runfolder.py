"""A run's output folder, named in one place (torch-free: every layer imports it).

``OUTPUT/``
  ``run_config.json``      the resolved run config (written by rank 0 at start)
  ``metrics.jsonl``        one JSON object per logged step (and per evaluation)
  ``final_metrics.json``   written once the run has finished: its presence means "done"
  ``tb/``                  TensorBoard events
  ``checkpoints/``
    ``stepNNNNNNNN/``      DeepSpeed's files for every rank, and ``COMPLETE.json`` once published
    ``latest_complete``    the newest published tag (atomically replaced)

A checkpoint folder without ``COMPLETE.json`` (a crash mid-write) is never resumed from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_SNAPSHOT = "run_config.json"
METRICS = "metrics.jsonl"
FINAL_METRICS = "final_metrics.json"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"
POINTER = "latest_complete"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    """The checkpoint folder name of ``step``: ``stepNNNNNNNN``."""
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    """The step a checkpoint folder name stands for; None for any other name."""
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def complete_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps with a published (complete) checkpoint in ``ckpt_dir``, ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(step for child in ckpt_dir.iterdir()
                  if (step := step_of(child.name)) is not None and (child / COMPLETE).is_file())


def latest_complete(ckpt_dir: str | Path) -> int | None:
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else None


def unfinished_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps whose checkpoint folder exists without ``COMPLETE.json`` (saves that never finished)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(step for child in ckpt_dir.iterdir()
                  if (step := step_of(child.name)) is not None and not (child / COMPLETE).exists())


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run's output folder."""
    root: Path

    @property
    def config_snapshot(self) -> Path:
        return self.root / CONFIG_SNAPSHOT

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def final_metrics(self) -> Path:
        return self.root / FINAL_METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / tag_for(step)

    def latest_complete(self) -> int | None:
        return latest_complete(self.checkpoints)

    def has_checkpoints(self) -> bool:
        """Whether any checkpoint folder (complete or not) exists: a run that started saving."""
        return self.checkpoints.is_dir() and any(step_of(p.name) is not None for p in self.checkpoints.iterdir())

    def finished(self) -> bool:
        return self.final_metrics.is_file()
