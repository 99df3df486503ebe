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
(``parallel.nvme_swap_ids``).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from xfm_scale.durable import fsync_path, write_atomically
from xfm_scale.model.tp_layout import partition_spec

COMPLETE = "COMPLETE.json"
POINTER = "latest_complete"
_TAG = re.compile(r"^step(\d{8})$")
log = logging.getLogger(__name__)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_steps(ckpt_dir: str | Path) -> list[int]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        match = _TAG.match(child.name)
        if match and (child / COMPLETE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_complete(ckpt_dir: str | Path) -> int | None:
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else None


def agreed_latest_complete(ckpt_dir: str | Path) -> int | None:
    """Rank 0's :func:`latest_complete`, the same on every rank: a rank reading a shared
    filesystem's cached listing could otherwise resume from another step than its peers."""
    choice = [latest_complete(ckpt_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def check_visible_to_every_rank(marker: Path, key: str, wait_s: float = 60.0) -> None:
    """Raise on every rank (ConfigError naming ``key``) unless every rank sees ``marker``, which
    rank 0 has just written into the output folder. Every rank writes its ZeRO partitions there,
    so a folder that is not shared by all nodes would otherwise fail at the first save, hours
    in, as a write error. A shared folder slow to show a new file (NFS attribute caching) gets
    ``wait_s``."""
    import socket

    from xfm_scale.config import ConfigError

    dist.barrier()
    deadline = time.monotonic() + wait_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (socket.gethostname(), marker.exists()))
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
    import torch

    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    from xfm_scale.parallel import collective_device

    if dist.get_rank() == 0 and (ckpt_dir / tag).is_dir():
        # A save of this step that never completed (a crash mid-write), or a complete one of an
        # earlier run in this folder that was not resumed (train.resume: false): its files,
        # perhaps of another ZeRO stage or layout, must not mix with this save's, and its
        # COMPLETE.json must not vouch for a folder being rewritten.
        if (ckpt_dir / tag / COMPLETE).exists():
            log.warning("replacing %s, saved by an earlier run that this one did not resume", ckpt_dir / tag)
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    dist.barrier()

    errors: list[Exception] = []
    written: list[str] = []  # this rank's partition files, made durable before COMPLETE.json

    def recording(write):
        # A failed write must not skip DeepSpeed's later collectives (a rank that raised would wait
        # in our all_reduce while the others wait in DeepSpeed's barrier): record it and go on.
        def call(*args, **kwargs):
            try:
                result = write(*args, **kwargs)
            except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
                errors.append(err)
                return None
            if write.__name__ == "save":  # checkpoint_engine.save(state_dict, path)
                written.append(kwargs.get("path", args[1] if len(args) > 1 else None))
            return result
        return call

    # DeepSpeed's two writers in save_checkpoint: every partition file, and rank 0's copy of its
    # zero_to_fp32.py recovery script.
    writers = [(engine.checkpoint_engine, "save"), (engine, "_copy_recovery_script")]
    originals = [getattr(obj, name) for obj, name in writers]
    for (obj, name), original in zip(writers, originals):
        setattr(obj, name, recording(original))
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as err:  # anything else that failed before DeepSpeed's barrier
        errors.append(err)
    finally:
        for (obj, name), original in zip(writers, originals):
            setattr(obj, name, original)
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
    failed = torch.tensor([float(error is not None)], device=collective_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() == 0 and dist.get_rank() == 0:
        problem = verify(ckpt_dir / tag, client_state["layout"])
        failed.fill_(float(problem is not None))
        error = error or (OSError(problem) if problem else None)
    dist.broadcast(failed, src=0)
    if failed.item():
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
    from xfm_scale.parallel import swapped_state_files

    files = swapped_state_files(engine)
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
    import zipfile

    from xfm_scale.zero_checkpoint import CheckpointError, missing_partitions, partition_files

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
    for child in ckpt_dir.iterdir():
        match = _TAG.match(child.name)
        if match and int(match.group(1)) < below and not (child / COMPLETE).exists():
            shutil.rmtree(child, ignore_errors=True)


def load(engine, ckpt_dir: str | Path, step: int) -> dict:
    """Load model, optimizer and scheduler state of a complete checkpoint; return its client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag_for(step), load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_for(step)} from {ckpt_dir}")
    from xfm_scale.parallel import restore_unswapped_optimizer_state

    restore_unswapped_optimizer_state(engine, Path(ckpt_dir) / tag_for(step))
    return client_state
