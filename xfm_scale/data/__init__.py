"""Data: webdataset shards, the blend (weighted deterministic mixture), and the loader.

Public entry points (see docs/data.md):
* :func:`build_blend` (spec path + num_samples + seed + cache dir) -> :class:`Blend`
* :class:`BlendLoader` (blend, :class:`LoaderConfig`, dp_rank, dp_size): yields Batch objects,
  ``state_dict()`` / ``load_state_dict()``, ``bad_samples``
* :func:`build_demo_data` -> :class:`DemoData` (spec, tokenizer dir, held-out eval set)
* :func:`check_spec` (spec path): the cheap pre-launch check; raises :class:`DataSpecError`

Names resolve lazily so the CLIs that only write shards or blends do not import torch.
"""
from importlib import import_module

_WHERE = {
    "Blend": "blend", "build_blend": "blend", "format_report": "blend",
    "DemoData": "demo", "build_demo_data": "demo",
    "BadSampleCounter": "loader", "BlendLoader": "loader", "LoaderConfig": "loader",
    "load_pair_eval_set": "loader", "load_tokenizer": "loader",
    "DataSpecError": "shards", "write_corpus": "shards", "check_spec": "spec",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
