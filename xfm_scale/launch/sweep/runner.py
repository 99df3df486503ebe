"""Running a sweep (:func:`run_sweep`): planning which runs to launch (not finished, launchable, not
failed before unless retried), launching them as subprocesses at most N at a time, each on a free
master port, and recording each :class:`Outcome` in the state file and the :class:`SweepReport`.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

from xfm_scale.launch.sweep.results import write_results
from xfm_scale.launch.sweep.spec import Run, SweepSpec, command_for, expand, launch_problem
from xfm_scale.launch.sweep.state import read_state, settings_changed, sweep_lock, write_run_record, write_state
from xfm_scale.runfolder import FINAL_METRICS

Log = Callable[[str], None]


@dataclass(kw_only=True)
class Outcome:
    """What happened to one launched run."""

    run: Run
    returncode: int
    """Exit status of the command (negative: killed by that signal)."""
    seconds: float
    """Wall time of the command."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.run.finished


@dataclass(kw_only=True)
class SweepReport:
    """The sweep's result, by run name."""

    planned: list[str] = field(default_factory=list)
    """Runs launched (or, in a dry run, that would be)."""
    finished: list[str] = field(default_factory=list)
    """Runs finished in this invocation."""
    already_finished: list[str] = field(default_factory=list)
    """Runs skipped because their final_metrics.json existed."""
    failed: list[str] = field(default_factory=list)
    """Runs that failed in this invocation."""
    skipped_failed: list[str] = field(default_factory=list)
    """Runs that failed before and were not retried (no --retry-failed)."""
    invalid: dict[str, str] = field(default_factory=dict)
    """Runs not launched because the launch check failed: name -> why."""

    @property
    def complete(self) -> bool:
        return not (self.failed or self.skipped_failed)


def run_sweep(spec: SweepSpec, *, max_parallel: int = 1, retry_failed: bool = False, dry_run: bool = False,
              env: dict[str, str] | None = None, log: Log = print) -> SweepReport:
    """Launch every run that is neither finished nor (without ``retry_failed``) failed before, at most
    ``max_parallel`` at a time; then write results.csv / results.md. ``dry_run``: print, write nothing."""
    runs, report = expand(spec), SweepReport()
    if dry_run:
        for run in _plan(spec, runs, read_state(spec.output_root), retry_failed, report, log):
            log(f"would run {run.name}: {shlex.join(command_for(spec, run))}")
        return report
    spec.output_root.mkdir(parents=True, exist_ok=True)
    with sweep_lock(spec.output_root):  # held from reading the state to writing the results
        state = read_state(spec.output_root)
        todo = _plan(spec, runs, state, retry_failed, report, log)
        for name, why in report.invalid.items():
            state[name] = {"status": "invalid", "reason": why}
        _execute(spec, todo, state, max_parallel, env, report, log)
        write_state(spec.output_root, state)
        write_results(spec, runs)
    return report


# ---- planning -------------------------------------------------------------------------------------------
def _plan(spec: SweepSpec, runs: list[Run], state: dict, retry_failed: bool, report: SweepReport,
          log: Log) -> list[Run]:
    todo = []
    for run in runs:
        if run.finished:
            report.already_finished.append(run.name)
            _warn_if_changed(spec, run, log)
        elif (problem := launch_problem(spec, run) or _resume_problem(spec, run)) is not None:
            report.invalid[run.name] = problem
            log(f"skip {run.name}: cannot launch: {problem}")
        elif state.get(run.name, {}).get("status") == "failed" and not retry_failed:
            report.skipped_failed.append(run.name)
            log(f"skip {run.name}: failed before (exit {state[run.name].get('returncode')}, log "
                f"{run.log}); pass --retry-failed to run it again")
        else:
            todo.append(run)
            report.planned.append(run.name)
    log(f"{len(runs)} runs: {len(report.already_finished)} finished, {len(todo)} to run, "
        f"{len(report.skipped_failed)} failed before, {len(report.invalid)} cannot launch")
    return todo


def _warn_if_changed(spec: SweepSpec, run: Run, log: Log) -> None:
    if settings_changed(spec, run):
        log(f"warning: {run.name} finished with a different base config, command or fixed values; its "
            f"results are kept. Delete {run.output_dir} to run it again with the current ones")


def _resume_problem(spec: SweepSpec, run: Run) -> str | None:
    """A started run whose settings changed since: relaunched, the entry point would resume its
    checkpoints (trained with the old settings) under the new ones, and its results would look
    like the new settings'. Refused, with the way out."""
    if not settings_changed(spec, run):
        return None
    if not run.folder.has_checkpoints():
        return None  # nothing to resume: it starts afresh with the current settings
    return (f"its checkpoints in {run.folder.checkpoints} were written with a different base config, "
            f"command or fixed values, and a relaunch would resume them with the current ones; delete "
            f"{run.output_dir} to start it afresh, or restore the sweep file")


# ---- executing ------------------------------------------------------------------------------------------
def _execute(spec: SweepSpec, todo: list[Run], state: dict, max_parallel: int, env: dict | None,
             report: SweepReport, log: Log) -> None:
    pool = ThreadPoolExecutor(max_workers=max_parallel)
    try:
        futures = {}
        for run in todo:
            attempt = state.get(run.name, {}).get("attempts", 0) + 1
            futures[pool.submit(_launch, spec, run, attempt, env)] = attempt
        for done, future in enumerate(as_completed(futures), start=1):
            outcome = future.result()
            _record(spec, outcome, futures[future], state, report)
            log(_outcome_line(outcome, done, len(todo)))
    finally:
        # On Ctrl-C the queued runs must not start while the running ones wind down (the terminal's
        # SIGINT reaches them too: they share this process group).
        pool.shutdown(wait=True, cancel_futures=True)


def _record(spec: SweepSpec, outcome: Outcome, attempt: int, state: dict, report: SweepReport) -> None:
    name = outcome.run.name
    state[name] = {"status": "finished" if outcome.ok else "failed", "attempts": attempt,
                   "returncode": outcome.returncode, "seconds": round(outcome.seconds, 1),
                   "log": str(outcome.run.log)}
    # Saved after every run, so a sweep killed half-way still knows which runs failed.
    write_state(spec.output_root, state)
    (report.finished if outcome.ok else report.failed).append(name)


def _outcome_line(outcome: Outcome, done: int, total: int) -> str:
    head = f"[{done}/{total}] {outcome.run.name}"
    if outcome.ok:
        return f"{head}: finished in {outcome.seconds:.1f}s"
    why = (f"exit {outcome.returncode}" if outcome.returncode else f"exited 0 without writing {FINAL_METRICS}")
    return f"{head}: FAILED ({why}); log: {outcome.run.log}"


def _launch(spec: SweepSpec, run: Run, attempt: int, env: dict | None) -> Outcome:
    run.output_dir.mkdir(parents=True, exist_ok=True)
    argv = command_for(spec, run, master_port=_free_port())
    write_run_record(spec, run, argv, attempt)
    child_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    # Appended: the log of a failed attempt stays readable after a retry.
    with open(run.log, "a") as out:
        out.write(f"==== sweep attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{shlex.join(argv)}\n")
        out.flush()
        try:
            returncode = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env).returncode
        except OSError as err:  # e.g. the launcher is not on PATH: a failed run, not a crashed sweep
            out.write(f"cannot start {argv[0]}: {err}\n")
            returncode = 127
    return Outcome(run=run, returncode=returncode, seconds=time.perf_counter() - start)


# ---- ports ----------------------------------------------------------------------------------------------
_PORTS_TAKEN: set[int] = set()
_PORTS_LOCK = threading.Lock()


def _free_port() -> int:
    """A port free now, never handed out twice by this process: parallel runs get distinct ports
    even before their ranks bind them."""
    with _PORTS_LOCK:
        while True:
            with socket.socket() as sock:
                sock.bind(("", 0))
                port = sock.getsockname()[1]
            if port not in _PORTS_TAKEN:
                _PORTS_TAKEN.add(port)
                return port
