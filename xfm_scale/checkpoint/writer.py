"""Checkpoints through DeepSpeed's save_checkpoint, published only when complete.

Layout: ``OUTPUT/checkpoints/stepNNNNNNNN/`` (DeepSpeed's files for every rank) plus our
``COMPLETE.json`` written by rank 0 after every rank has returned from save_checkpoint and a
barrier: a checkpoint without it (a crash mid-write) is never resumed from. ``latest_complete``
(an atomically replaced file) names the newest; the last K complete ones are kept.

Client state: the data cursor, the step, the resolved run config, the TP layout
(``universal_checkpoint_info`` for DeepSpeed's ds_to_universal, with our strided parameters), and
the seed (dropout and ITM sampling are reseeded from (seed, step) every step, so the seed and the
step determine every RNG stream: nothing else needs saving), and, for readers at another layout,
the global rank of every (DP, TP) rank and the ids of NVMe swap files
(:func:`xfm_scale.engine.checkpoint_io.nvme_swap_ids`). DeepSpeed's save and load themselves go
through :mod:`xfm_scale.engine.checkpoint_io`.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

import torch.distributed as dist

from xfm_scale.checkpoint.reader import CheckpointError, missing_partitions, partition_files
from xfm_scale.config import ConfigError
from xfm_scale.distributed import any_rank, from_rank_zero, gather_objects
from xfm_scale.durable import fsync_path, write_atomically
from xfm_scale.engine import checkpoint_io
from xfm_scale.model.tp_layout import partition_spec
from xfm_scale.runfolder import COMPLETE, POINTER, complete_steps, latest_complete, tag_for, unfinished_steps

log = logging.getLogger(__name__)


def agreed_latest_complete(ckpt_dir: str | Path) -> int | None:
    """Rank 0's :func:`latest_complete`, the same on every rank: a rank reading a shared
    filesystem's cached listing could otherwise resume from another step than its peers."""
    return from_rank_zero(latest_complete(ckpt_dir) if dist.get_rank() == 0 else None)


def check_visible_to_every_rank(marker: Path, key: str, wait_s: float = 60.0) -> None:
    """Raise on every rank (ConfigError naming ``key``) unless every rank sees ``marker``, which
    rank 0 has just written into the output folder. Every rank writes its ZeRO partitions there,
    so a folder that is not shared by all nodes would otherwise fail at the first save, hours
    in, as a write error. A shared folder slow to show a new file (NFS attribute caching) gets
    ``wait_s``."""
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = gather_objects((socket.gethostname(), marker.exists()))
    blind = sorted({f"{host} (rank {rank})" for rank, (host, ok) in enumerate(seen) if not ok})
    if blind:
        raise ConfigError(f"{key}={marker.parent}: {marker.name}, written there by rank 0, is not visible on "
                          f"{', '.join(blind)}; every rank writes its checkpoint partitions into this folder, so "
                          f"set {key} to storage that every node shares")


def universal_checkpoint_info(model, vocab_size: int, padded_vocab_size: int) -> dict:
    """DeepSpeed's universal-checkpoint patterns from the parameters' megatron TP attributes:
    replicated, row-parallel (split on dim 1), vocabulary (padded), and our strided (fused QKV/KV)."""
    replicated, row, strided = [], [], {}
    for name, param in model.named_parameters():
        spec = partition_spec(param)
        pattern = "^" + re.escape(name) + "$"
        if spec is None:
            replicated.append(pattern)
        elif spec[0] == 1:
            row.append(pattern)
        if spec is not None and spec[1] > 1:
            strided[name] = spec[1]
    return {"tp_replicated_parameter_patterns": replicated,
            "parameter_with_row_parallelism_patterns": row,
            "vocabulary_parameter_patterns": [r"word_embeddings\.weight$", r"mlm_head\.bias$"],
            "original_vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size,
            "xfm_strided_parameters": strided}


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank (disk full, storage gone); nothing was published."""


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int) -> Path:
    """Write, verify, then publish: every rank writes its part; if any rank failed (disk full...)
    all raise CheckpointSaveError and the partial folder is removed; otherwise rank 0 checks that
    every rank's files are there and readable, then writes COMPLETE.json and the pointer."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    if dist.get_rank() == 0 and (ckpt_dir / tag).is_dir():
        # A save of this step that never completed (a crash mid-write), or a complete one of an
        # earlier run in this folder that was not resumed (train.resume: false): its files,
        # perhaps of another ZeRO stage or layout, must not mix with this save's, and its
        # COMPLETE.json must not vouch for a folder being rewritten.
        if (ckpt_dir / tag / COMPLETE).exists():
            log.warning("replacing %s, saved by an earlier run that this one did not resume", ckpt_dir / tag)
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    dist.barrier()

    written, errors = checkpoint_io.save_recording_writes(engine.deepspeed, str(ckpt_dir), tag, client_state)
    if not errors:
        written += _swap_files_written(engine, ckpt_dir / tag, errors)
    if not errors:
        # On disk before rank 0 publishes COMPLETE.json: after a node crash (not just a killed
        # process) a published checkpoint must not hold files still in the page cache.
        try:
            for path in [*filter(None, written), ckpt_dir / tag]:
                fsync_path(path)
        except OSError as err:
            errors.append(err)
    error = errors[0] if errors else None
    failed = any_rank(error is not None)
    if not failed and dist.get_rank() == 0:
        problem = verify(ckpt_dir / tag, client_state["layout"])
        error = OSError(problem) if problem else None
    failed = from_rank_zero(failed or error is not None)
    if failed:
        if dist.get_rank() == 0:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # never published, so never resumed from
        dist.barrier()
        previous = latest_complete(ckpt_dir)
        kept = (f"the previous checkpoint {tag_for(previous)} is intact and a relaunch resumes from it"
                if previous is not None else "there is no earlier checkpoint")
        raise CheckpointSaveError(f"saving checkpoint {tag} in {ckpt_dir} failed ({error or 'on another rank'}); "
                                  f"free space there or point train.output_dir at other storage; {kept}")
    if dist.get_rank() == 0:
        meta = {"step": step, "time": time.time(), "world_size": dist.get_world_size()}
        write_atomically(ckpt_dir / tag / COMPLETE, json.dumps(meta))
        write_atomically(ckpt_dir / POINTER, tag)
        for old in complete_steps(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / tag_for(old), ignore_errors=True)
        _remove_unfinished(ckpt_dir, below=step)
    dist.barrier()
    return ckpt_dir / tag


def _swap_files_written(engine, tag_folder: Path, errors: list[Exception]) -> list[Path]:
    """This rank's NVMe swap files as DeepSpeed's save copied them (a plain copytree, which we
    neither wrap nor see fail part way): each must be there at its full size, the only copy of the
    swapped weights and Adam moments. Returns them and their folders, to be made durable."""
    files = checkpoint_io.swapped_state_files(engine.deepspeed)
    if not files:
        return []
    folder = tag_folder / "offloaded_tensors" / f"rank{dist.get_rank():02d}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size < size:
            errors.append(OSError(f"{path} is missing or shorter than {size} bytes after the save"))
    return [*(folder / name for name in files), folder, folder.parent]


def verify(folder: Path, layout: dict) -> str | None:
    """None when every rank's model and optimizer files are present and readable archives."""
    try:
        files = partition_files(folder)
    except CheckpointError as err:
        return str(err)
    missing = missing_partitions(files, layout["tensor_parallel_size"], layout["data_parallel_size"])
    if missing:
        return f"{folder}: {missing[0]} is missing after the save"
    unreadable = [path for path in files.values() if not zipfile.is_zipfile(path)]
    return f"{unreadable[0]} is unreadable after the save" if unreadable else None


def _remove_unfinished(ckpt_dir: Path, below: int) -> None:
    """Folders of saves that never completed (a crash mid-write) before the one just published."""
    for step in unfinished_steps(ckpt_dir):
        if step < below:
            shutil.rmtree(ckpt_dir / tag_for(step), ignore_errors=True)


def load(engine, ckpt_dir: str | Path, step: int) -> dict:
    """Load model, optimizer and scheduler state of a complete checkpoint; return its client state."""
    tag_folder = Path(ckpt_dir) / tag_for(step)
    client_state = checkpoint_io.load(engine.deepspeed, str(ckpt_dir), tag_for(step),
                                      lambda dp, tp: partition_files(tag_folder)[("optim", dp, tp)])
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_for(step)} from {ckpt_dir}")
    return client_state
