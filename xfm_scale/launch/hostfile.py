"""Launch-time checks: hostfiles, rank counts and batch/TP divisibility, before any rank starts.

Everything here runs in the launching process (a sweep, a wrapper, or ``launchers/pretrain_large.py``
before it builds anything), imports no torch at module level, and raises :class:`LaunchError` with a
message naming the file/line or the value and the fix. The resource arithmetic mirrors DeepSpeed's
runner (``deepspeed/launcher/runner.py``: ``_parse_hostfile``, ``parse_inclusion_exclusion``,
``apply_num_nodes_and_gpus``) so :func:`world_size_from` is the ``WORLD_SIZE`` the ranks will see;
``tests/launch/test_hostfile.py`` checks that parity against the runner's own functions.

Where the runner silently does something other than what was asked, these functions raise instead:
a ``--hostfile`` path that does not exist (the runner falls back to local GPUs), ``slots=0`` or
``slots=4abc`` (the runner reads 0 and 4), two hosts on one line (it keeps the first),
``num_nodes`` above the hosts listed (it uses all of them) and ``num_gpus`` above a host's slots
(it starts ranks on device ids the host does not have).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

# The runner reads this hostfile when --hostfile is not given (DLTS clusters); mirrored so the
# world size computed here matches what it starts.
DEEPSPEED_DEFAULT_HOSTFILE = "/job/hostfile"
HOSTFILE_FORMAT = "expected `HOSTNAME slots=N` (e.g. `worker-0 slots=8`), one host per line"


class LaunchError(ValueError):
    """A launch set-up error whose message says what to change."""


@dataclass(frozen=True, kw_only=True)
class Host:
    """One line of a DeepSpeed/MPI-style hostfile."""

    name: str
    """Hostname (or address) as the runner will ssh/pdsh to it; also the name --include uses."""
    slots: int
    """Ranks (GPUs) the runner may start on this host; a positive integer."""


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """How the ranks of one run split into model-parallel and data-parallel groups."""

    world_size: int
    """Total ranks started (all nodes)."""
    tensor_parallel_size: int
    """Ranks sharing one model copy (megatron TP)."""
    data_parallel_size: int
    """world_size / tensor_parallel_size: model copies, each seeing different samples."""
    micro_steps: int
    """Micro-batches accumulated per optimizer step (DeepSpeed's gradient_accumulation_steps)."""


# ---- hostfile -------------------------------------------------------------------------------------
def parse_hostfile(path: str | os.PathLike) -> list[Host]:
    """Parse a DeepSpeed hostfile: ``HOSTNAME slots=N`` per line, ``#`` comments, blank lines.

    Accepts what DeepSpeed's runner accepts, including trailing ``# comments`` and MPI-style
    ``key=value`` fields after ``slots=N`` (``max_slots=8``; ignored, as the runner ignores them).
    Raises :class:`LaunchError` naming the file, line number, the line and the fix for: a missing
    file, a line not of that form, slots not a positive integer, a host listed twice, no hosts.
    """
    path = Path(path)
    if not path.is_file():
        # The runner would warn and silently train on this machine's GPUs only.
        raise LaunchError(f"hostfile {path} does not exist; fix the path (one `HOSTNAME slots=N` "
                          f"line per node) or drop --hostfile to run on this machine only")
    hosts: dict[str, tuple[int, Host]] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        host = _parse_host_line(path, lineno, raw)
        if host is None:
            continue
        if host.name in hosts:
            first = hosts[host.name][0]
            raise LaunchError(f"{path}:{lineno}: host {host.name!r} is listed again (first on line "
                              f"{first}): {raw.strip()!r}; list each host once, with all its slots")
        hosts[host.name] = (lineno, host)
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts (only blank lines or comments); "
                          f"{HOSTFILE_FORMAT}")
    return [host for _, host in hosts.values()]


def _parse_host_line(path: Path, lineno: int, raw: str) -> Host | None:
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    # A `#` token starts an inline comment (`worker-0 slots=8  # spare node`), which the runner
    # accepts because its pattern only anchors the start of the line.
    tokens = line.split()
    for i, token in enumerate(tokens):
        if token.startswith("#"):
            tokens = tokens[:i]
            break

    def bad(problem: str, fix: str = HOSTFILE_FORMAT) -> LaunchError:
        return LaunchError(f"{path}:{lineno}: {problem}: {line!r}; {fix}")

    if len(tokens) < 2 or "=" in tokens[0]:
        raise bad("not a host line")
    if tokens[1] in ("slots", "slots=") or tokens[1].startswith(("slots:", "=")):
        raise bad("malformed slots", "write `slots=N` with no spaces, e.g. `worker-0 slots=8`")
    if not tokens[1].startswith("slots="):
        raise bad("second field is not slots=N")
    value = tokens[1][len("slots="):]
    if not value.isdigit() or int(value) < 1:
        raise bad(f"slots={value} is not a positive integer",
                  "give the number of GPUs on that host, e.g. `slots=8`")
    extra = [token for token in tokens[2:] if "=" not in token or token.startswith("slots=")]
    if extra:
        # `a slots=4 b slots=4`: the runner would keep `a` and drop `b` without a word.
        raise bad(f"unexpected {extra[0]!r} after slots", HOSTFILE_FORMAT)
    return Host(name=tokens[0], slots=int(value))


# ---- resources and world size ---------------------------------------------------------------------
def resources_from(hostfile: str | os.PathLike | None = None, num_nodes: int | None = None,
                   num_gpus: int | None = None, include: str | None = None,
                   exclude: str | None = None) -> "OrderedDict[str, list[int]]":
    """The ``{host: [device ids]}`` the DeepSpeed runner would start ranks on, in rank order.

    Same arguments and meaning as the runner's ``--hostfile``, ``--num_nodes``, ``--num_gpus``,
    ``--include``, ``--exclude`` (None: not given). Without a hostfile (and no
    ``/job/hostfile``) the pool is this machine: ``num_gpus`` ranks, else every device the
    runner's accelerator counts (visible GPUs).
    """
    for name, value in (("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if value is not None and value < 1:
            raise LaunchError(f"{name}={value}: must be >= 1 (or leave it out)")
    if include and exclude:
        raise LaunchError("include and exclude are mutually exclusive (as in the DeepSpeed runner); "
                          "use one of them")
    if (include or exclude) and (num_nodes is not None or num_gpus is not None):
        raise LaunchError("num_nodes/num_gpus cannot be combined with include/exclude (the DeepSpeed "
                          "runner refuses it); select hosts and slots with include/exclude only")
    pool, from_hostfile = _resource_pool(hostfile, num_gpus)
    if num_nodes is not None and num_nodes > 1 and not from_hostfile:
        raise LaunchError(f"num_nodes={num_nodes} but no hostfile lists other nodes; pass a hostfile "
                          f"with one `HOSTNAME slots=N` line per node")
    active = OrderedDict((host, list(range(slots))) for host, slots in pool.items())
    if include or exclude:
        active = _filter(active, include or "", exclude or "")
    active = _trim(active, num_nodes, num_gpus, pool)
    if not active:
        raise LaunchError(f"include={include!r} exclude={exclude!r} leaves no ranks to start; "
                          f"keep at least one host and slot")
    return active


def world_size_from(hostfile: str | os.PathLike | None = None, num_nodes: int | None = None,
                    num_gpus: int | None = None, include: str | None = None,
                    exclude: str | None = None) -> int:
    """Total ranks the DeepSpeed runner would start with these flags (its ``WORLD_SIZE``).

    ``world_size_from("hosts")`` sums the hostfile's slots; ``world_size_from(num_gpus=4)`` is 4
    ranks on one node; ``num_nodes`` keeps the first N hosts; ``num_gpus`` with a hostfile is N
    ranks on each kept host; ``include``/``exclude`` use the runner's ``NAME[:SLOT,...]@...`` form.
    ``--no_ssh``/``--node_rank`` do not change it: every node's runner starts its share of the same
    world. Raises :class:`LaunchError` naming the fix when the flags are inconsistent.
    """
    return sum(len(slots) for slots in resources_from(hostfile, num_nodes, num_gpus, include,
                                                      exclude).values())


def _resource_pool(hostfile, num_gpus: int | None) -> tuple["OrderedDict[str, int]", bool]:
    """``({host: slots}, whether a hostfile defined it)``."""
    if hostfile is None and os.path.isfile(DEEPSPEED_DEFAULT_HOSTFILE):
        hostfile = DEEPSPEED_DEFAULT_HOSTFILE
    if hostfile is not None:
        return OrderedDict((host.name, host.slots) for host in parse_hostfile(hostfile)), True
    if num_gpus is not None:
        return OrderedDict(localhost=num_gpus), False
    count = _local_device_count()
    if count == 0:
        raise LaunchError("no hostfile and no GPU visible on this machine; pass num_gpus (--num_gpus N) "
                          "or a hostfile with one `HOSTNAME slots=N` line per node")
    return OrderedDict(localhost=count), False


def _local_device_count() -> int:
    """What the runner counts without a hostfile: its accelerator's devices (visible CUDA GPUs;
    with DS_ACCELERATOR=cpu, NUMA nodes)."""
    from deepspeed.accelerator import get_accelerator  # only here: this module must import cheaply

    return get_accelerator().device_count()


def _trim(active, num_nodes: int | None, num_gpus: int | None, pool) -> "OrderedDict[str, list[int]]":
    if num_nodes is not None:
        if num_nodes > len(active):
            raise LaunchError(f"num_nodes={num_nodes} but the hostfile lists {len(active)} host(s) "
                              f"({', '.join(active)}); add hosts or lower num_nodes")
        active = OrderedDict(list(active.items())[:num_nodes])
    if num_gpus is not None:
        for host in active:
            if num_gpus > pool[host]:
                raise LaunchError(f"num_gpus={num_gpus} but host {host!r} has slots={pool[host]}; "
                                  f"lower num_gpus to <= {pool[host]} or fix that host's slots")
        active = OrderedDict((host, list(range(num_gpus))) for host in active)
    return active


def _parse_node_specs(spec: str, flag: str) -> "OrderedDict[str, list[int]]":
    """``"w0@w1:0,2"`` -> ``{"w0": [], "w1": [0, 2]}`` (empty: the whole host), as the runner reads it."""
    nodes: OrderedDict[str, list[int]] = OrderedDict()
    for node in spec.split("@"):
        name, _, slots = node.partition(":")
        if not name:
            raise LaunchError(f"{flag}={spec!r}: empty host name; use NAME[:SLOT[,SLOT...]][@NAME...]")
        ids = nodes.setdefault(name, [])
        for slot in (slots.split(",") if slots else []):
            if not slot.strip().isdigit():
                raise LaunchError(f"{flag}={spec!r}: slot {slot!r} of host {name!r} is not a device "
                                  f"index; use NAME[:SLOT[,SLOT...]], e.g. worker-1:0,2")
            ids.append(int(slot))
    return OrderedDict((name, sorted(set(ids))) for name, ids in nodes.items())


def _filter(active, include: str, exclude: str) -> "OrderedDict[str, list[int]]":
    flag, spec = ("include", include) if include else ("exclude", exclude)
    chosen: dict[str, list[int]] = {} if include else {h: list(s) for h, s in active.items()}
    for name, slots in _parse_node_specs(spec, flag).items():
        if name not in active:
            raise LaunchError(f"{flag}={spec!r}: host {name!r} is not in the hostfile "
                              f"({', '.join(active)}); fix the name")
        for slot in slots:
            if slot not in active[name]:
                raise LaunchError(f"{flag}={spec!r}: host {name!r} has no slot {slot} "
                                  f"(slots 0..{len(active[name]) - 1})")
        if include:
            chosen[name] = slots or list(active[name])
        else:
            chosen[name] = [s for s in chosen[name] if s not in slots] if slots else []
    # Rank order follows the hostfile, not the filter string (as in the runner).
    return OrderedDict((host, chosen[host]) for host in active if chosen.get(host))


def world_size_of_command(argv: list[str]) -> int | None:
    """Ranks a launch command starts, read from its ``deepspeed`` or ``torchrun`` (``python -m
    torch.distributed.run``) flags before the script; None when the flags do not say (no
    --num_gpus nor hostfile: the runner counts the GPUs of the machine it runs on; torchrun's
    ``--nproc_per_node gpu`` or elastic ``--nnodes 1:4``; any other launcher)."""
    exe = Path(argv[0]).name
    if exe == "deepspeed":
        flags = _flags(argv[1:], {"--hostfile": "hostfile", "-H": "hostfile", "--num_nodes": "num_nodes",
                                  "--num_gpus": "num_gpus", "--num_accelerators": "num_gpus",
                                  "--include": "include", "-i": "include", "--exclude": "exclude",
                                  "-e": "exclude"})
        for key in ("num_nodes", "num_gpus"):
            if key in flags:
                flags[key] = _int_flag(flags[key], key)
        if "hostfile" not in flags and "num_gpus" not in flags:
            return None  # the runner counts this machine's GPUs, which this one need not have
        return world_size_from(**flags)
    if exe == "torchrun" or argv[1:3] == ["-m", "torch.distributed.run"]:
        flags = _flags(argv[1:], {"--nproc_per_node": "nproc", "--nproc-per-node": "nproc",
                                  "--nnodes": "nnodes"})
        nproc, nnodes = flags.get("nproc", "1"), flags.get("nnodes", "1")
        if nproc.isdigit() and nnodes.isdigit():  # "gpu", "auto" or "1:4" (elastic): unknown
            return int(nproc) * int(nnodes)
    return None


def _flags(args: list[str], wanted: dict[str, str]) -> dict[str, str]:
    """``--flag value`` / ``--flag=value`` pairs of a launcher's own arguments (before the script)."""
    out = {}
    for i, arg in enumerate(args):
        if arg.endswith(".py"):
            break
        name, eq, value = arg.partition("=")
        if name in wanted:
            out[wanted[name]] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return out


def _int_flag(value: str, name: str) -> int:
    if not value.lstrip("-").isdigit():
        raise LaunchError(f"--{name} {value!r} is not an integer")
    return int(value)


# ---- tensor / data parallel and batch ---------------------------------------------------------------
def check_launch(world_size: int, tensor_parallel_size: int, global_batch_size: int,
                 micro_batch_size: int) -> LaunchPlan:
    """Check that the ranks split into TP groups and the global batch into micro-batches.

    ``tensor_parallel_size`` must divide ``world_size``; ``global_batch_size`` must be a multiple
    of ``micro_batch_size x data-parallel size`` (DeepSpeed's train_batch_size =
    micro batch x accumulation steps x DP). Returns the resulting :class:`LaunchPlan`; raises
    :class:`LaunchError` naming the value to change and the valid choices.
    """
    for name, value in (("world_size", world_size), ("tensor_parallel_size", tensor_parallel_size),
                        ("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LaunchError(f"{name}={value!r}: must be a positive integer")
    if world_size % tensor_parallel_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise LaunchError(f"tensor_parallel_size={tensor_parallel_size} does not divide the {world_size} "
                          f"ranks; choose a divisor of {world_size} ({', '.join(map(str, divisors))}) "
                          f"or start a multiple of {tensor_parallel_size} ranks")
    data_parallel_size = world_size // tensor_parallel_size
    per_micro_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_micro_step:
        lower = global_batch_size // per_micro_step * per_micro_step
        nearest = " or ".join(str(n) for n in (lower, lower + per_micro_step) if n > 0)
        raise LaunchError(f"global_batch_size={global_batch_size} is not divisible by micro_batch_size "
                          f"({micro_batch_size}) x data-parallel size ({data_parallel_size}) = "
                          f"{per_micro_step}; choose a multiple of {per_micro_step} (e.g. {nearest})")
    return LaunchPlan(world_size=world_size, tensor_parallel_size=tensor_parallel_size,
                      data_parallel_size=data_parallel_size,
                      micro_steps=global_batch_size // per_micro_step)
