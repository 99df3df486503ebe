"""Read a checkpoint our trainer wrote through DeepSpeed ZeRO-3 or ZeRO-2, at any (DP, TP), as full tensors.

ZeRO-3: a tag folder holds, per TP rank t and DP rank d, ``zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt``
(this rank's slice of every sub-group's flat fp32 master weights and Adam moments) and
``..._model_states.pt`` (parameter shapes per sub-group, the scheduler, our client state). A
parameter of TP shard t is the concatenation over d of its ceil(numel / DP) slice in sub-group g's
flat partition, cut to numel.

ZeRO-2: one ``mp_rank_{t:02d}_model_states.pt`` per TP rank (the same metadata), and the same
optimizer file names; each param group's flat fp32 buffer is cut into DP contiguous partitions
(parameters reordered and padded for alignment), and each file's ``param_slice_mappings`` says
where each parameter's fragment lies in that rank's partition: a parameter is the concatenation
of its fragments in DP-rank order.

Either way the TP shards merge by the layout recorded in the client state
(``universal_checkpoint_info``: row-parallel on dim 1, replicated, strided fused QKV/KV).

With the optimizer offloaded to NVMe (ZeRO-Infinity, ds_configs/zero3_nvme_template.json)
DeepSpeed leaves the swapped sub-groups' partitions empty in the optimizer files and copies its
swap files into ``TAG/offloaded_tensors/rank{global rank:02d}/``: ``{id}.tensor.swp`` (the fp32
partition), ``exp_avg-{id}.tensor.swp`` and ``exp_avg_sq-{id}.tensor.swp``, each the raw fp32
partition, then padding up to the aio alignment (whatever the buffer held: only the partition's
length is read). Our client state records each sub-group's ``id``
(``nvme_swap_ids``) and the global rank of every (DP, TP) rank (``layout.global_ranks``), which
DeepSpeed's files do not say; the swap files are then read like the partitions (memory-mapped).
A save from before these were recorded is refused with the way out.

Why not DeepSpeed's own tools: zero_to_fp32 refuses TP > 1, and its universal checkpoint loader
partitions over DP only (megatron TP shards would each receive the full tensor). This reader streams: the files are
memory-mapped, and one merged tensor at a time is materialised.

Trust: files are opened with ``weights_only=True``; the only classes allowed besides tensors are
DeepSpeed's, listed in :mod:`xfm_scale.engine.safe_globals` (imported only when a file is read:
this module imports without DeepSpeed).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from xfm_scale import runfolder
from xfm_scale.engine.safe_globals import load_trusted
from xfm_scale.model import tp_layout

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
# ZeRO-3 writes model states per (DP, TP) rank (zero_pp_rank_D_mp_rank_TT_model_states.pt), ZeRO-2
# one per TP rank (mp_rank_TT_model_states.pt, counted as DP rank 0 here); optimizer states are per
# (DP, TP) rank in both.
_FILE = re.compile(r"^(?:(?:bf16_)?zero_pp_rank_(\d+)_)?mp_rank_(\d+)_(optim|model)_states\.pt$")
NVME_OFFLOADED = "offloaded_tensors"
"""The sub-folder where DeepSpeed saves optimizer state swapped to NVMe (engine.save_checkpoint)."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read; the message names the folder and the fix."""


@dataclass(frozen=True)
class Piece:
    """A run of one parameter's elements in one DP rank's flat partition of a param group."""
    dp_rank: int
    group: int
    start: int
    numel: int


@dataclass(frozen=True)
class Slot:
    """Where a TP shard of a parameter lives: its pieces, in order (the last may run past the
    parameter's end into padding), and its shape."""
    pieces: tuple[Piece, ...]
    shard_shape: torch.Size


class ZeroCheckpoint:
    """One complete checkpoint folder (a tag such as ``step00000200``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist; pass a folder such as "
                                  "OUTPUT/checkpoints/step00000200 (or --checkpoint OUTPUT/checkpoints)")
        files = partition_files(self.folder)
        model_files = sorted(k for k in files if k[0] == "model")
        if not model_files:
            raise CheckpointError(f"{self.folder} holds no DeepSpeed ZeRO model_states files; pass a checkpoint "
                                  "tag folder written by the trainer")
        self.tp = 1 + max(t for _, _, t in model_files)
        meta = load_trusted(files[("model", 0, 0)])
        if "universal_checkpoint_info" not in meta or "model_config" not in meta:
            raise CheckpointError(f"{self.folder} was not written by xfm_scale's trainer (no TP layout or model "
                                  "config in its client state)")
        self.dp = int(meta["dp_world_size"])
        self.stage = int(meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
        if self.stage not in (2, 3):
            raise CheckpointError(f"{self.folder} was saved with ZeRO stage {self.stage}; export and resharding "
                                  "read ZeRO-2 and ZeRO-3 checkpoints (zero_optimization.stage 2 or 3)")
        if int(meta.get("mp_world_size", self.tp)) != self.tp:
            raise CheckpointError(f"{self.folder}: model_states files for {self.tp} TP ranks, but it was saved "
                                  f"with {meta['mp_world_size']}; the folder is incomplete")
        missing = missing_partitions(files, self.tp, self.dp)
        if missing:
            raise CheckpointError(f"{self.folder} is incomplete: {len(missing)} partition file(s) missing, "
                                  f"e.g. {missing[0]}; use another checkpoint (one with COMPLETE.json)")
        self.meta = meta
        self._files = files
        self._optim: dict[tuple[int, int], dict] = {}
        self._swapped: dict[tuple[int, int, int, str], torch.Tensor] = {}
        self._model_metas: dict[int, dict] = {0: meta}

    def _model_meta(self, t: int) -> dict:
        """TP rank t's model states (DP rank 0's file): parameter shapes, our client state. Read
        once: every swap-file lookup asks."""
        if t not in self._model_metas:
            self._model_metas[t] = load_trusted(self._files[("model", 0, t)])
        return self._model_metas[t]

    # ---- what the checkpoint says ------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @cached_property
    def nvme_offloaded(self) -> bool:
        """Saved with the optimizer offloaded to NVMe: some tensors are in DeepSpeed's swap files,
        not in the partition files. Looked up once: every partition read asks."""
        return (self.folder / NVME_OFFLOADED).is_dir()

    def nvme_swap_ids(self, t: int) -> list[str | None] | None:
        """TP rank t's recorded NVMe swap-file id per sub-group (None: not swapped), as
        :func:`xfm_scale.engine.checkpoint_io.nvme_swap_ids` gave it; None when saved without NVMe offload."""
        return self._model_meta(t).get("nvme_swap_ids")

    def require_tensors(self) -> None:
        """Raise unless the fp32 weights and Adam state are readable here: in the partition files, or
        in NVMe swap files whose sub-groups the client state names. The metadata (config, step,
        layout) stays readable either way, as a same-layout resume needs."""
        if self.nvme_offloaded and (self.meta.get("nvme_swap_ids") is None
                                    or "global_ranks" not in self.meta.get("layout", {})):
            raise CheckpointError(
                f"{self.folder} was saved with the optimizer offloaded to NVMe by an xfm_scale that did not record "
                f"which sub-group each swap file in {NVME_OFFLOADED}/ holds, so export and resharding cannot read "
                "it. Resume it at its saved layout (same TP, DP and ZeRO stage, with the NVMe config) with this "
                "version and save again (train.save_every), then export or reshard that checkpoint")

    def _swap_file(self, d: int, t: int, group: int, key: str) -> torch.Tensor | None:
        """Sub-group ``group``'s ``key`` partition of rank (d, t) from its NVMe swap file, memory-mapped
        (copy-on-write: nothing is written back); None when that sub-group was not swapped."""
        if (d, t, group, key) in self._swapped:
            return self._swapped[(d, t, group, key)]
        swap_id = self.nvme_swap_ids(t)[group]
        if swap_id is None:
            return None
        rank = self.meta["layout"]["global_ranks"][d][t]
        name = f"{swap_id}.tensor.swp" if key == "fp32" else f"{key}-{swap_id}.tensor.swp"
        path = self.folder / NVME_OFFLOADED / f"rank{rank:02d}" / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the NVMe-offloaded optimizer state of DP rank {d}, TP rank "
                                  f"{t} is incomplete; use another checkpoint (one with COMPLETE.json)")
        self._swapped[(d, t, group, key)] = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
        return self._swapped[(d, t, group, key)]

    @cached_property
    def partition_specs(self) -> dict[str, tuple[int, int] | None]:
        """(dim, stride) per parameter name, None when replicated over TP."""
        info = self.meta["universal_checkpoint_info"]
        replicated = [re.compile(p) for p in info["tp_replicated_parameter_patterns"]]
        row = [re.compile(p) for p in info["parameter_with_row_parallelism_patterns"]]
        strided = info.get("xfm_strided_parameters", {})
        specs = {}
        for name in self.param_names:
            if any(p.match(name) for p in replicated):
                specs[name] = None
            else:
                specs[name] = (1 if any(p.match(name) for p in row) else 0, int(strided.get(name, 1)))
        return specs

    @cached_property
    def _slots(self) -> list[dict[str, Slot]]:
        """Per TP rank: parameter name -> slot, in the order of ``param_shapes`` (the param groups')."""
        out = []
        for t in range(self.tp):
            meta = self._model_meta(t)
            pieces = self._zero2_pieces(t) if self.stage == 2 else self._zero3_pieces(meta["param_shapes"])
            out.append({name: Slot(pieces[name], torch.Size(shape))
                        for shapes in meta["param_shapes"] for name, shape in shapes.items()})
        return out

    def _zero3_pieces(self, param_shapes: list[dict]) -> dict[str, tuple[Piece, ...]]:
        """ZeRO-3 partitions every parameter: ceil(numel / DP) elements on each DP rank, one after
        another in ``param_shapes`` order within a sub-group's flat partition."""
        out = {}
        for group, shapes in enumerate(param_shapes):
            offset = 0
            for name, shape in shapes.items():
                part = math.ceil(math.prod(shape) / self.dp)
                out[name] = tuple(Piece(d, group, offset, part) for d in range(self.dp))
                offset += part
        return out

    def _zero2_pieces(self, t: int) -> dict[str, tuple[Piece, ...]]:
        """ZeRO-2 partitions each param group's flat buffer; the fragments DeepSpeed recorded per
        DP rank, in rank order."""
        out: dict[str, list[Piece]] = {}
        for d in range(self.dp):
            mappings = self._optim_file(d, t)["optimizer_state_dict"]["param_slice_mappings"]
            for group, fragments in enumerate(mappings):
                for name, address in fragments.items():
                    out.setdefault(name, []).append(Piece(d, group, int(address.start), int(address.numel)))
        return {name: tuple(pieces) for name, pieces in out.items()}

    @property
    def param_names(self) -> list[str]:
        return list(self._slots[0])

    def full_shape(self, name: str) -> torch.Size:
        shape = list(self._slots[0][name].shard_shape)
        spec = self.partition_specs[name]
        if spec is not None:
            shape[spec[0]] *= self.tp
        return torch.Size(shape)

    def optimizer_step_count(self) -> float:
        torch_state = self._torch_optimizer_state(0, 0)
        state = next(iter(torch_state["state"].values()), {})
        step = state.get("step", torch_state["param_groups"][0].get("step"))  # Apex keeps it per group
        return float(step)

    def param_groups(self) -> list[dict]:
        """The optimizer's param-group hyperparameters (lr, weight decay, ...), without params."""
        groups = self._torch_optimizer_state(0, 0)["param_groups"]
        return [{k: v for k, v in g.items() if k != "params"} for g in groups]

    # ---- tensors ---------------------------------------------------------------------------------------
    def _optim_file(self, d: int, t: int) -> dict:
        if (d, t) not in self._optim:
            self._optim[(d, t)] = load_trusted(self._files[("optim", d, t)])
        return self._optim[(d, t)]

    def _torch_optimizer_state(self, d: int, t: int) -> dict:
        """The wrapped torch optimizer's state dict (Adam moments per param group's flat partition)."""
        sd = self._optim_file(d, t)["optimizer_state_dict"]
        return sd["base_optimizer_state"] if self.stage == 2 else sd["optimizer_state_dict"]

    def _flat(self, d: int, t: int, group: int, key: str) -> torch.Tensor:
        sd = self._optim_file(d, t)["optimizer_state_dict"]
        if key == "fp32":
            flat_groups = sd["single_partition_of_fp32_groups"] if self.stage == 2 else sd["fp32_flat_groups"]
            flat = flat_groups[group].detach()
        else:
            flat = self._torch_optimizer_state(d, t)["state"][group][key].detach()
        if self.nvme_offloaded and (flat.numel() == 0 or self.meta.get("nvme_swap_ids") is not None):
            self.require_tensors()
            # A swapped sub-group's state is its swap file's, whatever the partition file holds:
            # an empty placeholder, or (DeepSpeed's pipelined swapper never releases it) a stale view
            # of a reused buffer.
            if (swapped := self._swap_file(d, t, group, key)) is not None:
                return swapped
        return flat

    def shard(self, name: str, key: str, t: int) -> torch.Tensor:
        """TP shard t of one parameter's ``key`` state (fp32 weights or an Adam moment)."""
        slot = self._slots[t][name]
        pieces = [self._flat(p.dp_rank, t, p.group, key).narrow(0, p.start, p.numel) for p in slot.pieces]
        return torch.cat(pieces)[:math.prod(slot.shard_shape)].view(slot.shard_shape)

    def full(self, name: str, key: str = "fp32") -> torch.Tensor:
        """One parameter, merged over DP and TP."""
        if key not in STATE_KEYS:
            raise ValueError(f"key {key!r}; one of {STATE_KEYS}")
        spec = self.partition_specs[name]
        if spec is None:
            return self.shard(name, key, 0).clone()
        return tp_layout.merge([self.shard(name, key, t) for t in range(self.tp)], *spec)

    def tensors(self, key: str = "fp32") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.param_names:
            yield name, self.full(name, key)


def partition_files(folder: str | Path) -> dict[tuple[str, int, int], Path]:
    """DeepSpeed's per-rank files in a tag folder: (``model`` | ``optim``, DP rank, TP rank) -> path."""
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if match := _FILE.match(path.name):
            key = (match.group(3), int(match.group(1) or 0), int(match.group(2)))
            if key in files:  # e.g. a ZeRO-3 and a ZeRO-2 save of the same step in one folder
                raise CheckpointError(f"{folder} holds both {files[key].name} and {path.name}: files of two "
                                      "different saves; use another checkpoint (one with COMPLETE.json)")
            files[key] = path
    return files


def missing_partitions(files: dict[tuple[str, int, int], Path], tp: int, dp: int) -> list[str]:
    """What a (TP, DP) save writes that ``files`` lacks, described by rank: every rank's optimizer
    partition and each TP rank's model states."""
    expected = [("optim", d, t) for t in range(tp) for d in range(dp)] + [("model", 0, t) for t in range(tp)]
    return [f"the optimizer states of DP rank {d}, TP rank {t}" if kind == "optim" else
            f"the model states of TP rank {t}" for kind, d, t in expected if (kind, d, t) not in files]


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """A tag folder from a tag folder, or from a checkpoints folder (+ ``tag``, default the latest
    complete one). Refuses a folder without COMPLETE.json (a save that did not finish)."""
    path = Path(path)
    if tag is not None:
        path = path / tag
    elif not (path / runfolder.COMPLETE).exists() and path.is_dir() and not any(_FILE.match(p.name) for p in path.iterdir()):
        step = runfolder.latest_complete(path)
        if step is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (no stepNNNNNNNN/COMPLETE.json); "
                                  "pass the trainer's OUTPUT/checkpoints folder or one tag folder")
        path = path / runfolder.tag_for(step)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; fix --checkpoint/--tag")
    if not (path / runfolder.COMPLETE).is_file():
        raise CheckpointError(f"{path} has no {runfolder.COMPLETE}: its save did not finish; use an earlier "
                              "checkpoint")
    json.loads((path / runfolder.COMPLETE).read_text())
    return path
