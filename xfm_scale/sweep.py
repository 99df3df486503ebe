"""Sweeps: the cartesian product of run-config overrides, one launched run per grid point.

A sweep file (YAML; example: ``launchers/sweeps/example.yaml``)::

    base_config: launchers/configs/demo_tiny.yaml  # the run config every run starts from
    output_root: runs/sweeps/lr_tp               # OUTPUT_ROOT/<run name>/ per run
    command: deepspeed --num_gpus {num_gpus} --master_port {master_port} launchers/pretrain_large.py
    grid:                                        # dotted run-config key -> values (the product)
      optim.lr: [1e-4, 2e-4]
      parallel.tensor_parallel_size: [1, 2]
    fixed: {num_gpus: 2, train.steps: 50}        # the same for every run
    names: {parallel.tensor_parallel_size: tp}   # short names used in run names

Each run executes ``COMMAND --config BASE --output-dir OUTPUT_ROOT/NAME --set key=value ...``
(stdout and stderr to ``NAME/run.log``). A key used as a ``{placeholder}`` in the command (such as
``num_gpus``) fills the placeholder instead of becoming a ``--set``; so the number of ranks can be
a grid key. Built-in placeholders: ``{python}`` (this interpreter), ``{run_name}``,
``{output_dir}``, ``{master_port}`` (a port free on this machine, so parallel runs do not collide).

A run is finished when its ``final_metrics.json`` exists; finished runs are never redone. Failed
runs are recorded in ``OUTPUT_ROOT/sweep_state.json`` and re-run only when asked. At the end every
finished run's metrics and grid values go to ``OUTPUT_ROOT/results.csv`` and ``results.md``.
Relative paths in the sweep file are resolved from the current directory (like the command's
``launchers/pretrain_large.py``).
"""
from __future__ import annotations

import csv
import difflib
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import socket
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from xfm_scale.launch import LaunchError, check_launch, world_size_of_command
from xfm_scale.yaml_files import read_yaml

DEFAULT_COMMAND = "deepspeed --num_gpus {num_gpus} --master_port {master_port} launchers/pretrain_large.py"
TOP_LEVEL_KEYS = ("base_config", "output_root", "command", "grid", "fixed", "names")
BUILTIN_PLACEHOLDERS = ("python", "run_name", "output_dir", "master_port")
STATE_FILE = "sweep_state.json"
RUN_RECORD = "sweep_run.json"
FINAL_METRICS = "final_metrics.json"
MAX_NAME_CHARS = 200  # file names are limited to 255 bytes; leave room for suffixes


class SweepError(LaunchError):
    """An invalid sweep file (the CLI exits 2); the message names the key and the fix."""


class SweepBusy(RuntimeError):
    """Another sweep holds this output root."""


@dataclass(kw_only=True)
class SweepSpec:
    """A validated sweep file."""

    path: Path
    """The sweep file itself (named in messages)."""
    base_config: Path
    """Run config every run starts from (passed as --config)."""
    output_root: Path
    """Each run writes to output_root/<run name>/; state and results files live here."""
    command: str
    """Launch command template up to and including the entry script; {placeholders} filled per run."""
    grid: dict[str, list[Any]]
    """Key -> values; the runs are their cartesian product, first key varying slowest."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Key -> value applied to every run (before the grid values)."""
    names: dict[str, str] = field(default_factory=dict)
    """Grid key -> short name in run names (default: the shortest unique dotted suffix)."""

    def placeholders(self) -> list[str]:
        """The {fields} of the command template, in order."""
        return [name for token in shlex.split(self.command) for _, name, _, _ in string.Formatter().parse(token)
                if name is not None]


@dataclass(kw_only=True)
class Run:
    """One grid point."""

    name: str
    """Stable, file-name-safe name built from the grid values, e.g. ``lr=0.0002,tp=2``."""
    values: dict[str, Any]
    """This run's grid values (key -> value), in grid order."""
    output_dir: Path
    """output_root/name (passed as --output-dir)."""
    overrides: dict[str, Any]
    """Run-config overrides passed as --set key=value (fixed, then grid)."""
    launch_vars: dict[str, Any]
    """Values of the command's {placeholders} that come from the sweep file (e.g. num_gpus)."""

    @property
    def finished(self) -> bool:
        return (self.output_dir / FINAL_METRICS).is_file()


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


# ---- loading and validation -----------------------------------------------------------------------
class _SweepLoader(yaml.SafeLoader):
    """PyYAML reads ``1e-4`` and ``1.0e4`` (a float needs both a dot and a signed exponent there) as
    *strings*, and learning-rate grids are written so. This loader reads them as floats, as YAML 1.2
    does; a quoted "1e-4" stays a string."""


_SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep file; raises :class:`SweepError` naming the key and the fix."""
    path = Path(path)
    raw = _read_yaml(path)
    _check_top_level(path, raw)
    grid = _check_grid(path, raw.get("grid"))
    fixed = _check_mapping(path, raw, "fixed")
    names = _check_mapping(path, raw, "names")
    for key in set(grid) & set(fixed):
        raise SweepError(f"{path}: {key!r} is under both grid and fixed; keep it in one of them")
    spec = SweepSpec(path=path, base_config=_check_base_config(path, raw), grid=grid, fixed=fixed,
                     output_root=Path(_required_str(path, raw, "output_root")),
                     command=_check_str(path, raw, "command", DEFAULT_COMMAND), names={})
    spec.names = _check_names(spec, names)
    _check_keys(spec)
    runs = expand(spec)
    _check_unique_names(spec, runs)
    return spec


def _read_yaml(path: Path) -> dict:
    raw = read_yaml(path, what="sweep file", error=SweepError, loader=_SweepLoader)
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path} must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    return raw


def _check_top_level(path: Path, raw: dict) -> None:
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SweepError(f"{path}: unknown key {key!r}; {hint}known keys: {', '.join(TOP_LEVEL_KEYS)}")


def _required_str(path: Path, raw: dict, key: str) -> str:
    if key not in raw:
        raise SweepError(f"{path}: missing required key {key!r}")
    return _check_str(path, raw, key, None)


def _check_str(path: Path, raw: dict, key: str, default: str | None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise SweepError(f"{path}: {key} must be a non-empty string, got {value!r}")
    return value


def _check_base_config(path: Path, raw: dict) -> Path:
    base = Path(_required_str(path, raw, "base_config"))
    if not base.is_file():
        raise SweepError(f"{path}: base_config {base} does not exist (relative paths are resolved "
                         f"from the current directory, {os.getcwd()}); fix the path")
    return base


def _check_mapping(path: Path, raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SweepError(f"{path}: {key} must be a mapping of key: value, got {type(value).__name__}")
    return dict(value)


def _check_grid(path: Path, grid: Any) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{path}: grid must be a non-empty mapping of dotted key -> list of values, "
                         f"e.g. grid: {{optim.lr: [1.0e-4, 2.0e-4]}}")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise SweepError(f"{path}: grid.{key} must be a list of values, e.g. [{values!r}]; put a "
                             f"single value under fixed:")
        if not values:
            raise SweepError(f"{path}: grid.{key} is an empty list; give at least one value or remove "
                             f"the key")
        labels = [_value_label(v) for v in values]
        for label in labels:
            if labels.count(label) > 1:
                raise SweepError(f"{path}: grid.{key} lists {label} twice; list each value once")
    return {str(k): list(v) for k, v in grid.items()}


def _check_names(spec: SweepSpec, names: dict) -> dict[str, str]:
    for key, short in names.items():
        if key not in spec.grid:
            raise SweepError(f"{spec.path}: names.{key}: not a grid key; names: maps grid keys "
                             f"({', '.join(spec.grid)}) to short names")
        if not isinstance(short, str) or _sanitise(short) != short or not short:
            raise SweepError(f"{spec.path}: names.{key}={short!r}: use letters, digits, '.', '_', '-'")
    resolved = {**_default_names(list(spec.grid)), **{str(k): v for k, v in names.items()}}
    shorts = list(resolved.values())
    for key, short in resolved.items():
        if shorts.count(short) > 1:
            raise SweepError(f"{spec.path}: two grid keys are named {short!r} in run names; give one "
                             f"of them another name under names:")
    return resolved


def _check_keys(spec: SweepSpec) -> None:
    placeholders = spec.placeholders()
    for name in placeholders:
        if name in BUILTIN_PLACEHOLDERS:
            continue
        if not name.isidentifier():
            raise SweepError(f"{spec.path}: command: placeholder {{{name}}} is not a plain name; use "
                             f"{{name}} with no format spec")
        if name not in spec.grid and name not in spec.fixed:
            raise SweepError(f"{spec.path}: command uses {{{name}}} but the sweep gives it no value; set "
                             f"it under fixed: (e.g. fixed: {{{name}: 2}}) or grid:, or fix the "
                             f"placeholder (built-in: {', '.join(BUILTIN_PLACEHOLDERS)})")
    for section in ("grid", "fixed"):
        for key in getattr(spec, section):
            if key in BUILTIN_PLACEHOLDERS:
                raise SweepError(f"{spec.path}: {section}.{key}: {key!r} is a built-in placeholder "
                                 f"and is set per run; remove it")
            if key in placeholders:
                continue
            if "." not in key or "=" in key or any(c.isspace() for c in key):
                raise SweepError(
                    f"{spec.path}: {section}.{key}: not a dotted run-config key (section.field, e.g. "
                    f"optim.lr) and not a {{{key}}} placeholder in command; fix the key, or use "
                    f"{{{key}}} in command (e.g. --num_gpus {{num_gpus}})")


def _check_unique_names(spec: SweepSpec, runs: list[Run]) -> None:
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise SweepError(f"{spec.path}: runs {seen[run.name].values} and {run.values} get the same "
                             f"name {run.name!r} once sanitised for file names; make the values differ "
                             f"in letters, digits, '.', '_', '-' or '+'")
        seen[run.name] = run


# ---- runs -------------------------------------------------------------------------------------------
def expand(spec: SweepSpec) -> list[Run]:
    """The runs of the grid's cartesian product, first grid key varying slowest."""
    placeholders = set(spec.placeholders())
    runs = []
    for combo in itertools.product(*spec.grid.values()):
        values = dict(zip(spec.grid, combo))
        merged = {**spec.fixed, **values}
        name = run_name(values, spec.names)
        runs.append(Run(name=name, values=values, output_dir=spec.output_root / name,
                        overrides={k: v for k, v in merged.items() if k not in placeholders},
                        launch_vars={k: v for k, v in merged.items() if k in placeholders}))
    return runs


def run_name(values: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """``{"optim.lr": 2e-4, "parallel.tensor_parallel_size": 2}``, ``{..: "tp"}`` ->
    ``lr=0.0002,tp=2``: short names (default: last dotted part) and values, safe as a file name."""
    names = {**_default_names(list(values)), **(names or {})}
    name = ",".join(f"{names[key]}={_sanitise(_value_label(value))}" for key, value in values.items())
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME_CHARS - 11]}-{digest}"
    return name


def _default_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with (optim.lr -> lr)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = _sanitise(suffix)
    return out


def _value_label(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _sanitise(text: str) -> str:
    # '=' and ',' separate keys in a run name; '/' would make a sub-folder.
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def format_value(value: Any) -> str:
    """A value as YAML text that ``yaml.safe_load`` (the entry point's ``--set`` parser) reads back
    as the same value: 1e-05 -> ``1.0e-05`` (PyYAML reads ``1e-05`` as a string), "yes" -> ``'yes'``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return text.removesuffix("\n...\n").strip()  # PyYAML ends a bare scalar with a document marker


def command_for(spec: SweepSpec, run: Run, master_port: int | str = "PORT") -> list[str]:
    """The argv that launches ``run``: the filled template, then --config, --output-dir, --set ..."""
    fill = {**{k: _value_label(v) for k, v in run.launch_vars.items()}, "python": sys.executable,
            "run_name": run.name, "output_dir": str(run.output_dir), "master_port": str(master_port)}
    # Split first, fill after: a value with spaces stays one argument.
    argv = [token.format(**fill) for token in shlex.split(spec.command)]
    argv += ["--config", str(spec.base_config), "--output-dir", str(run.output_dir)]
    for key, value in run.overrides.items():
        argv += ["--set", f"{key}={format_value(value)}"]
    return argv


# ---- launch check (before any rank starts) ---------------------------------------------------------------
ENTRY_POINTS = ("pretrain_large.py", "pretrain_base.py")
"""The launchers/ scripts whose run config the sweep can validate itself (as their --check does)."""


def launch_problem(spec: SweepSpec, run: Run) -> str | None:
    """Why ``run`` cannot start, or None: a TP/batch/hostfile mismatch (the world size from the
    launcher's flags, deepspeed or torchrun; the sizes from the base config's YAML plus the
    overrides) and, when the command runs an xfm_scale entry point, everything its ``--check``
    validates (keys, value ranges, paths, the blend spec), so a bad grid point is reported here
    rather than after its launch (with ``sbatch --wait``, after its queue wait)."""
    from xfm_scale.config import ConfigError

    try:
        command = command_for(spec, run, master_port=0)
        world = world_size_of_command(command)
        sizes = _batch_sizes(spec, run)
        if world is not None and sizes is not None:
            check_launch(world, *sizes)
        if any(Path(token).name in ENTRY_POINTS for token in command):
            _validate_run_config(spec, run, world)
    except (LaunchError, ConfigError) as err:
        return str(err)
    return None


def _validate_run_config(spec: SweepSpec, run: Run, world: int | None) -> None:
    """The entry point's validation of the run config it will load: the base config with this
    run's ``--set`` values, read back as the entry point reads them."""
    from xfm_scale import run_config

    overrides = run_config.parse_overrides([f"{key}={format_value(value)}" for key, value in run.overrides.items()])
    overrides["train.output_dir"] = str(run.output_dir)
    run_config.load(spec.base_config, overrides).validate(world)


def _batch_sizes(spec: SweepSpec, run: Run) -> tuple[int, int, int] | None:
    try:
        raw = yaml.load(spec.base_config.read_text(), Loader=_SweepLoader) or {}
    except yaml.YAMLError:
        return None  # the entry point reports a broken run config itself

    def get(dotted: str, default: Any = None) -> Any:
        if dotted in run.overrides:
            return run.overrides[dotted]
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return default if node is None else node

    sizes = (get("parallel.tensor_parallel_size", 1), get("batch.global_batch_size"),
             get("batch.micro_batch_size"))
    return sizes if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes) else None


# ---- state --------------------------------------------------------------------------------------------
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


def _write_state(output_root: Path, state: dict[str, dict]) -> None:
    # Write-then-rename: an interrupted sweep never leaves a half-written state file.
    tmp = output_root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"runs": state}, indent=1, sort_keys=True))
    os.replace(tmp, output_root / STATE_FILE)


def _fingerprint(spec: SweepSpec, run: Run) -> str:
    """What makes two runs of the same name the same run (the port changes every launch)."""
    return json.dumps({"base_config": str(spec.base_config), "command": spec.command,
                       "overrides": {k: format_value(v) for k, v in run.overrides.items()},
                       "launch_vars": {k: _value_label(v) for k, v in run.launch_vars.items()}},
                      sort_keys=True)


# ---- running --------------------------------------------------------------------------------------------
def run_sweep(spec: SweepSpec, *, max_parallel: int = 1, retry_failed: bool = False, dry_run: bool = False,
              env: dict[str, str] | None = None, log: Callable[[str], None] = print) -> SweepReport:
    """Launch every run that is neither finished nor (without ``retry_failed``) failed before, at most
    ``max_parallel`` at a time; then write results.csv / results.md. ``dry_run``: print, write nothing."""
    runs, report = expand(spec), SweepReport()
    if dry_run:
        for run in _plan(spec, runs, read_state(spec.output_root), retry_failed, report, log):
            log(f"would run {run.name}: {shlex.join(command_for(spec, run))}")
        return report
    spec.output_root.mkdir(parents=True, exist_ok=True)
    with _lock(spec.output_root):  # held from reading the state to writing the results
        state = read_state(spec.output_root)
        todo = _plan(spec, runs, state, retry_failed, report, log)
        for name, why in report.invalid.items():
            state[name] = {"status": "invalid", "reason": why}
        _execute(spec, todo, state, max_parallel, env, report, log)
        _write_state(spec.output_root, state)
        write_results(spec, runs)
    return report


def _plan(spec: SweepSpec, runs: list[Run], state: dict, retry_failed: bool, report: SweepReport,
          log: Callable[[str], None]) -> list[Run]:
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
                f"{run.output_dir / 'run.log'}); pass --retry-failed to run it again")
        else:
            todo.append(run)
            report.planned.append(run.name)
    log(f"{len(runs)} runs: {len(report.already_finished)} finished, {len(todo)} to run, "
        f"{len(report.skipped_failed)} failed before, {len(report.invalid)} cannot launch")
    return todo


def _recorded_fingerprint(run: Run) -> str | None:
    """The fingerprint the run was last launched with; None when it was not launched by a sweep."""
    try:
        return json.loads((run.output_dir / RUN_RECORD).read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _warn_if_changed(spec: SweepSpec, run: Run, log: Callable[[str], None]) -> None:
    recorded = _recorded_fingerprint(run)
    if recorded is not None and recorded != _fingerprint(spec, run):
        log(f"warning: {run.name} finished with a different base config, command or fixed values; its "
            f"results are kept. Delete {run.output_dir} to run it again with the current ones")


def _resume_problem(spec: SweepSpec, run: Run) -> str | None:
    """A started run whose settings changed since: relaunched, the entry point would resume its
    checkpoints (trained with the old settings) under the new ones, and its results would look
    like the new settings'. Refused, with the way out."""
    recorded = _recorded_fingerprint(run)
    if recorded is None or recorded == _fingerprint(spec, run):
        return None
    if not any((run.output_dir / "checkpoints").glob("step*")):
        return None  # nothing to resume: it starts afresh with the current settings
    return (f"its checkpoints in {run.output_dir / 'checkpoints'} were written with a different base config, "
            f"command or fixed values, and a relaunch would resume them with the current ones; delete "
            f"{run.output_dir} to start it afresh, or restore the sweep file")


def _execute(spec: SweepSpec, todo: list[Run], state: dict, max_parallel: int, env: dict | None,
             report: SweepReport, log: Callable[[str], None]) -> None:
    pool = ThreadPoolExecutor(max_workers=max_parallel)
    try:
        futures = {}
        for run in todo:
            attempt = state.get(run.name, {}).get("attempts", 0) + 1
            futures[pool.submit(_launch, spec, run, attempt, env)] = attempt
        for done, future in enumerate(as_completed(futures), start=1):
            outcome, attempt = future.result(), futures[future]
            name = outcome.run.name
            state[name] = {"status": "finished" if outcome.ok else "failed", "attempts": attempt,
                           "returncode": outcome.returncode, "seconds": round(outcome.seconds, 1),
                           "log": str(outcome.run.output_dir / "run.log")}
            # Saved after every run, so a sweep killed half-way still knows which runs failed.
            _write_state(spec.output_root, state)
            (report.finished if outcome.ok else report.failed).append(name)
            log(_outcome_line(outcome, done, len(todo)))
    finally:
        # On Ctrl-C the queued runs must not start while the running ones wind down (the terminal's
        # SIGINT reaches them too: they share this process group).
        pool.shutdown(wait=True, cancel_futures=True)


def _outcome_line(outcome: Outcome, done: int, total: int) -> str:
    head = f"[{done}/{total}] {outcome.run.name}"
    if outcome.ok:
        return f"{head}: finished in {outcome.seconds:.1f}s"
    why = (f"exit {outcome.returncode}" if outcome.returncode else f"exited 0 without writing {FINAL_METRICS}")
    return f"{head}: FAILED ({why}); log: {outcome.run.output_dir / 'run.log'}"


def _launch(spec: SweepSpec, run: Run, attempt: int, env: dict | None) -> Outcome:
    run.output_dir.mkdir(parents=True, exist_ok=True)
    argv = command_for(spec, run, master_port=_free_port())
    (run.output_dir / RUN_RECORD).write_text(json.dumps(
        {"name": run.name, "values": run.values, "argv": argv, "attempt": attempt,
         "fingerprint": _fingerprint(spec, run)}, indent=1, default=str))
    child_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    # Appended: the log of a failed attempt stays readable after a retry.
    with open(run.output_dir / "run.log", "a") as out:
        out.write(f"==== sweep attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{shlex.join(argv)}\n")
        out.flush()
        try:
            returncode = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env).returncode
        except OSError as err:  # e.g. the launcher is not on PATH: a failed run, not a crashed sweep
            out.write(f"cannot start {argv[0]}: {err}\n")
            returncode = 127
    return Outcome(run=run, returncode=returncode, seconds=time.perf_counter() - start)


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


class _lock:
    """One sweep per output root: a second one would launch the same pending runs into the same dirs."""

    def __init__(self, root: Path):
        self.path = root / ".sweep.lock"

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


# ---- results --------------------------------------------------------------------------------------------
def collect_results(spec: SweepSpec, runs: list[Run] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: one row per finished run (sorted by name) with ``run``, its grid values and
    every key of its final_metrics.json; columns are run, grid keys, then the metrics' union, sorted."""
    rows = []
    for run in sorted(runs if runs is not None else expand(spec), key=lambda r: r.name):
        if not run.finished:
            continue
        try:
            metrics = json.loads((run.output_dir / FINAL_METRICS).read_text())
        except json.JSONDecodeError:
            continue  # a run killed while writing it; it is not finished in any useful sense
        if isinstance(metrics, dict):
            rows.append({"run": run.name, **run.values, **{k: v for k, v in metrics.items() if k not in run.values}})
    metric_keys = sorted({k for row in rows for k in row} - {"run", *spec.grid})
    return ["run", *spec.grid, *metric_keys], rows


def write_results(spec: SweepSpec, runs: list[Run] | None = None) -> tuple[Path, Path]:
    """Write OUTPUT_ROOT/results.csv and results.md (a markdown table; missing values blank)."""
    columns, rows = collect_results(spec, runs)
    csv_path, md_path = spec.output_root / "results.csv", spec.output_root / "results.md"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_csv_cell(row.get(c)) for c in columns] for row in rows])
    csv_path.write_text(buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |" for row in rows]
    md_path.write_text(f"Sweep `{spec.path}`: {len(rows)} finished run(s).\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


def _csv_cell(value: Any) -> str:
    return "" if value is None else _value_label(value)


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return _value_label(value).replace("|", "\\|")
