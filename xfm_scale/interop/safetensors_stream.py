"""Write a .safetensors file one tensor at a time.

The safetensors package writes a file from a dict holding every tensor at once; an export of a
multi-billion-parameter model must hold one merged tensor at a time. The format is small and fixed
(https://github.com/huggingface/safetensors#format: an 8-byte little-endian header length, a JSON
header giving each tensor's dtype, shape and byte range, then the raw little-endian bytes), and every
shape is known before the merge starts, so we write the header first and stream the bytes after it.
The files are read back with the safetensors package (tests, transformers, timm).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from xfm_scale.durable import replace_durably

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class StreamingSafetensorsWriter:
    """``plan`` lists (name, shape, dtype) in the order :meth:`write` will be called."""

    def __init__(self, path: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._expected = list(plan)
        self._next = 0
        header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        for name, shape, dtype in plan:
            if name in header:
                raise ValueError(f"tensor {name!r} planned twice")
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._finished = False
        self._file = open(self._tmp, "wb")
        try:
            self._file.write(struct.pack("<Q", len(text)) + text)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expected):
            raise ValueError(f"{self.path}: {name!r} is past the planned tensors")
        want_name, want_shape, want_dtype = self._expected[self._next]
        if name != want_name or tuple(tensor.shape) != tuple(want_shape) or tensor.dtype != want_dtype:
            raise ValueError(f"{self.path}: got {name!r} {tuple(tensor.shape)} {tensor.dtype}, planned "
                             f"{want_name!r} {tuple(want_shape)} {want_dtype}")
        data = tensor.detach().contiguous().cpu()
        # raw bytes without a copy through numpy (which has no bfloat16)
        self._file.write(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def finish(self) -> None:
        """Complete the temporary file and flush it to disk (not yet visible under its name), so
        that several files can be written first and published together (:meth:`publish`)."""
        if self._finished:
            return
        try:
            if self._next != len(self._expected):
                missing = [n for n, _, _ in self._expected[self._next:]]
                raise ValueError(f"{self.path}: {len(missing)} planned tensors never written, e.g. {missing[:3]}")
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()
            raise
        self._file.close()
        self._finished = True

    def publish(self) -> Path:
        """Rename the finished file into place (atomic, and durable: see :func:`replace_durably`)."""
        self.finish()
        replace_durably(self._tmp, self.path, synced=True)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
