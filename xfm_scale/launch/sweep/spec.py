"""The sweep spec: reading and checking a sweep file (:func:`load_sweep`), its runs (:func:`expand`,
:class:`Run`), their names (:func:`run_name`), their command lines (:func:`command_for`,
:func:`format_value`) and whether each can launch (:func:`launch_problem`, with the entry point's own
run-config validation). Nothing here launches, locks or writes anything.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xfm_scale.config import run as run_config
from xfm_scale.config.errors import ConfigError
from xfm_scale.config.overrides import get_dotted
from xfm_scale.config.yaml_files import read_yaml
from xfm_scale.launch.hostfile import LaunchError, check_launch, world_size_of_command
from xfm_scale.runfolder import RunFolder

DEFAULT_COMMAND = "deepspeed --num_gpus {num_gpus} --master_port {master_port} launchers/pretrain_large.py"
TOP_LEVEL_KEYS = ("base_config", "output_root", "command", "grid", "fixed", "names")
BUILTIN_PLACEHOLDERS = ("python", "run_name", "output_dir", "master_port")
RUN_LOG = "run.log"
"""The command's stdout and stderr, in the run's output folder (appended to by every attempt)."""
MAX_NAME_CHARS = 200  # file names are limited to 255 bytes; leave room for suffixes
ENTRY_POINTS = ("pretrain_large.py", "pretrain_base.py")
"""The launchers/ scripts whose run config the sweep can validate itself (as their --check does)."""


class SweepError(LaunchError):
    """An invalid sweep file (the CLI exits 2); the message names the key and the fix."""


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
    def folder(self) -> RunFolder:
        """The run's output folder as the entry point lays it out."""
        return RunFolder(self.output_dir)

    @property
    def log(self) -> Path:
        return self.output_dir / RUN_LOG

    @property
    def finished(self) -> bool:
        return self.folder.finished()


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
    _check_unique_names(spec, expand(spec))
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
        _check_grid_values(path, key, values)
    return {str(k): list(v) for k, v in grid.items()}


def _check_grid_values(path: Path, key: Any, values: Any) -> None:
    if not isinstance(values, list):
        raise SweepError(f"{path}: grid.{key} must be a list of values, e.g. [{values!r}]; put a "
                         f"single value under fixed:")
    if not values:
        raise SweepError(f"{path}: grid.{key} is an empty list; give at least one value or remove "
                         f"the key")
    labels = [value_label(v) for v in values]
    for label in labels:
        if labels.count(label) > 1:
            raise SweepError(f"{path}: grid.{key} lists {label} twice; list each value once")


def _check_names(spec: SweepSpec, names: dict) -> dict[str, str]:
    for key, short in names.items():
        if key not in spec.grid:
            raise SweepError(f"{spec.path}: names.{key}: not a grid key; names: maps grid keys "
                             f"({', '.join(spec.grid)}) to short names")
        if not isinstance(short, str) or _sanitise(short) != short or not short:
            raise SweepError(f"{spec.path}: names.{key}={short!r}: use letters, digits, '.', '_', '-'")
    resolved = {**_default_names(list(spec.grid)), **{str(k): v for k, v in names.items()}}
    shorts = list(resolved.values())
    for short in shorts:
        if shorts.count(short) > 1:
            raise SweepError(f"{spec.path}: two grid keys are named {short!r} in run names; give one "
                             f"of them another name under names:")
    return resolved


def _check_keys(spec: SweepSpec) -> None:
    placeholders = spec.placeholders()
    for name in placeholders:
        _check_placeholder(spec, name)
    for section in ("grid", "fixed"):
        for key in getattr(spec, section):
            _check_key(spec, section, key, placeholders)


def _check_placeholder(spec: SweepSpec, name: str) -> None:
    if name in BUILTIN_PLACEHOLDERS:
        return
    if not name.isidentifier():
        raise SweepError(f"{spec.path}: command: placeholder {{{name}}} is not a plain name; use "
                         f"{{name}} with no format spec")
    if name not in spec.grid and name not in spec.fixed:
        raise SweepError(f"{spec.path}: command uses {{{name}}} but the sweep gives it no value; set "
                         f"it under fixed: (e.g. fixed: {{{name}: 2}}) or grid:, or fix the "
                         f"placeholder (built-in: {', '.join(BUILTIN_PLACEHOLDERS)})")


def _check_key(spec: SweepSpec, section: str, key: str, placeholders: list[str]) -> None:
    if key in BUILTIN_PLACEHOLDERS:
        raise SweepError(f"{spec.path}: {section}.{key}: {key!r} is a built-in placeholder "
                         f"and is set per run; remove it")
    if key in placeholders:
        return
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
    name = ",".join(f"{names[key]}={_sanitise(value_label(value))}" for key, value in values.items())
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME_CHARS - 11]}-{digest}"
    return name


def _default_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with (optim.lr -> lr)."""
    return {key: _sanitise(_shortest_unique_suffix(key, keys)) for key in keys}


def _shortest_unique_suffix(key: str, keys: list[str]) -> str:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
            break
    return suffix


def value_label(value: Any) -> str:
    """A grid value as text (run names, the command's placeholders, fingerprints, result cells)."""
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
    fill = {**{k: value_label(v) for k, v in run.launch_vars.items()}, "python": sys.executable,
            "run_name": run.name, "output_dir": str(run.output_dir), "master_port": str(master_port)}
    # Split first, fill after: a value with spaces stays one argument.
    argv = [token.format(**fill) for token in shlex.split(spec.command)]
    argv += ["--config", str(spec.base_config), "--output-dir", str(run.output_dir)]
    for key, value in run.overrides.items():
        argv += ["--set", f"{key}={format_value(value)}"]
    return argv


# ---- launch check (before any rank starts) ---------------------------------------------------------------
def launch_problem(spec: SweepSpec, run: Run) -> str | None:
    """Why ``run`` cannot start, or None: a TP/batch/hostfile mismatch (the world size from the
    launcher's flags, deepspeed or torchrun; the sizes from the base config's YAML plus the
    overrides) and, when the command runs an xfm_scale entry point, everything its ``--check``
    validates (keys, value ranges, paths, the blend spec), so a bad grid point is reported here
    rather than after its launch (with ``sbatch --wait``, after its queue wait)."""
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
    overrides = run_config.parse_overrides([f"{key}={format_value(value)}" for key, value in run.overrides.items()])
    overrides["train.output_dir"] = str(run.output_dir)
    run_config.load(spec.base_config, overrides).validate(world)


def _batch_sizes(spec: SweepSpec, run: Run) -> tuple[int, int, int] | None:
    """(TP size, global batch, micro batch) of ``run``: its overrides, else the base config's YAML;
    None when one is not a whole number (the entry point reports that itself)."""
    try:
        raw = yaml.load(spec.base_config.read_text(), Loader=_SweepLoader) or {}
    except yaml.YAMLError:
        return None  # the entry point reports a broken run config itself

    def get(dotted: str, default: Any = None) -> Any:
        return run.overrides[dotted] if dotted in run.overrides else get_dotted(raw, dotted, default)

    sizes = (get("parallel.tensor_parallel_size", 1), get("batch.global_batch_size"),
             get("batch.micro_batch_size"))
    return sizes if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes) else None
