"""The sweep's memory between invocations: the state file ``OUTPUT_ROOT/sweep_state.json`` (which
runs failed, finished or cannot launch), each launched run's record ``sweep_run.json`` with the
fingerprint of the settings it ran with, and the lock that keeps a second sweep off the same
output root (:class:`SweepBusy`).
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from xfm_scale.launch.sweep.spec import Run, SweepError, SweepSpec, format_value, value_label
from xfm_scale.runfolder import FINAL_METRICS

STATE_FILE = "sweep_state.json"
RUN_RECORD = "sweep_run.json"
LOCK_FILE = ".sweep.lock"


class SweepBusy(RuntimeError):
    """Another sweep holds this output root."""


# ---- the state file -----------------------------------------------------------------------------------
def read_state(output_root: Path) -> dict[str, dict]:
    """``{run name: {"status": "failed" | "finished" | "invalid", ...}}`` from earlier invocations."""
    path = output_root / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SweepError(f"sweep state {path} is unreadable; delete it (finished runs are recognised by "
                         f"their {FINAL_METRICS}, only the record of failed runs is lost)") from None


def write_state(output_root: Path, state: dict[str, dict]) -> None:
    """Write-then-rename: an interrupted sweep never leaves a half-written state file."""
    tmp = output_root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"runs": state}, indent=1, sort_keys=True))
    os.replace(tmp, output_root / STATE_FILE)


# ---- a run's record and fingerprint -------------------------------------------------------------------
def fingerprint(spec: SweepSpec, run: Run) -> str:
    """What makes two runs of the same name the same run (the port changes every launch)."""
    return json.dumps({"base_config": str(spec.base_config), "command": spec.command,
                       "overrides": {k: format_value(v) for k, v in run.overrides.items()},
                       "launch_vars": {k: value_label(v) for k, v in run.launch_vars.items()}},
                      sort_keys=True)


def write_run_record(spec: SweepSpec, run: Run, argv: list[str], attempt: int) -> None:
    """Record in the run's folder how it was launched, with the fingerprint of its settings."""
    (run.output_dir / RUN_RECORD).write_text(json.dumps(
        {"name": run.name, "values": run.values, "argv": argv, "attempt": attempt,
         "fingerprint": fingerprint(spec, run)}, indent=1, default=str))


def recorded_fingerprint(run: Run) -> str | None:
    """The fingerprint the run was last launched with; None when it was not launched by a sweep."""
    try:
        return json.loads((run.output_dir / RUN_RECORD).read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def settings_changed(spec: SweepSpec, run: Run) -> bool:
    """Whether the run was launched by a sweep with other settings than ``spec`` gives it now."""
    recorded = recorded_fingerprint(run)
    return recorded is not None and recorded != fingerprint(spec, run)


# ---- the lock -------------------------------------------------------------------------------------------
class sweep_lock:
    """One sweep per output root: a second one would launch the same pending runs into the same dirs."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SweepBusy(f"another sweep is running on {self.path.parent} (it holds {self.path}); "
                            f"wait for it to end") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
