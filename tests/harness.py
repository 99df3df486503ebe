"""Runs a test body on N real ranks (separate processes, gloo on CPU).

Every distributed test uses :func:`run_ranks`. The body is a top-level function (it is pickled by
reference into each rank process, forked from a server that has the heavy imports done); it
receives its arguments, reads its rank from
``torch.distributed`` after it calls ``xfm_scale.distributed.initialize`` (or its own init), and
returns a picklable result. The harness collects one result per rank, in rank order, and turns
a failure on any rank into a test failure carrying that rank's traceback. Nothing is mocked.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable


POLL_S = 2.0
"""How often the parent looks for results and for rank processes that died without one."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(fn, rank, world_size, port, results, args, kwargs):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    import torch

    torch.set_num_threads(1)  # N ranks share a 2-core machine
    try:
        # Serialised to bytes here: torch would otherwise share tensors through file descriptors
        # that disappear when this process exits, before the parent reads them.
        buffer = io.BytesIO()
        torch.save(fn(*args, **kwargs), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _load(payload: bytes):
    import torch

    # weights_only=False: the payload is this test's own result object, produced by our ranks.
    return torch.load(io.BytesIO(payload), weights_only=False)


# Ranks are forked from a server process that has already imported the heavy stack: a fresh
# interpreter spends ~7 s importing it (megatron-core alone imports torch._dynamo for its fusers),
# and the suite starts well over a hundred ranks. The server only imports (no threads, no process
# group, no tensors), so each fork starts clean; environment variables are set in the rank.
_PRELOAD = ["torch", "deepspeed", "megatron.core", "xfm_scale.distributed", "xfm_scale.train.trainer"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 600, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh ranks; return their results by rank."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(fn, r, world_size, port, results, args, kwargs))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    try:
        deadline, dead_before = time.monotonic() + timeout, set()
        while len(collected) < world_size:
            try:
                rank, status, payload = results.get(timeout=POLL_S)
            except queue.Empty:
                # A rank's queue is flushed before its process exits, so a rank still without a
                # result one empty poll after it was seen dead has none coming.
                dead_before = _check_dead_or_late(procs, collected, dead_before, deadline, timeout)
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            collected[rank] = _load(payload)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [collected[r] for r in range(world_size)]


def _check_dead_or_late(procs, collected: dict, dead_before: set, deadline: float, timeout: float) -> set:
    """Fail when a rank process ended without a result (killed by a signal, or a crash in native
    code that skipped its ``except``: naming its exit code), or when the time is up. Returns the
    ranks now seen dead without a result, for the next poll."""
    dead = {r for r, p in enumerate(procs) if r not in collected and p.exitcode is not None}
    if dead & dead_before:
        raise AssertionError("rank(s) ended without a result: " + ", ".join(
            _exit_description(r, procs[r].exitcode) for r in sorted(dead & dead_before)))
    if time.monotonic() > deadline:
        raise TimeoutError(f"ranks {sorted(set(range(len(procs))) - set(collected))} gave no result within {timeout}s")
    return dead


def _exit_description(rank: int, code: int) -> str:
    return f"rank {rank} exit code {code}" + (f" (killed by signal {-code})" if code < 0 else "")


RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for a tool run as a subprocess: without this process's rendezvous variables
    (a test process that initialised a world of one has them), so the tool starts its own world."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(DS_ACCELERATOR="cpu", **extra)
    return env
