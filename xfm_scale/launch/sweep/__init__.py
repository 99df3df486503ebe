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

The package, by job: :mod:`.spec` (the sweep file, its runs, their names and commands, the launch
check), :mod:`.state` (the state file, run records and fingerprints, the lock), :mod:`.runner`
(planning and launching the runs) and :mod:`.results` (results.csv / results.md).
"""
from xfm_scale.launch.sweep.results import RESULTS_CSV, RESULTS_MD, collect_results, write_results
from xfm_scale.launch.sweep.runner import Outcome, SweepReport, run_sweep
from xfm_scale.launch.sweep.spec import (BUILTIN_PLACEHOLDERS, DEFAULT_COMMAND, ENTRY_POINTS, MAX_NAME_CHARS, RUN_LOG,
                                         TOP_LEVEL_KEYS, Run, SweepError, SweepSpec, command_for, expand,
                                         format_value, launch_problem, load_sweep, run_name)
from xfm_scale.launch.sweep.state import RUN_RECORD, STATE_FILE, SweepBusy, read_state
from xfm_scale.runfolder import FINAL_METRICS

__all__ = ["BUILTIN_PLACEHOLDERS", "DEFAULT_COMMAND", "ENTRY_POINTS", "FINAL_METRICS", "MAX_NAME_CHARS", "RESULTS_CSV",
           "RESULTS_MD", "RUN_LOG", "RUN_RECORD", "STATE_FILE", "TOP_LEVEL_KEYS", "Outcome", "Run", "SweepBusy",
           "SweepError", "SweepReport", "SweepSpec", "collect_results", "command_for", "expand", "format_value",
           "launch_problem", "load_sweep", "read_state", "run_name", "run_sweep", "write_results"]
