"""Data: webdataset shards, the blend (weighted deterministic mixture), and the loader.

Public entry points (see docs/data.md):
* :func:`build_blend` (spec path + num_samples + seed + cache dir) -> :class:`Blend`
* :class:`BlendLoader` (blend, :class:`LoaderConfig`, dp_rank, dp_size): yields Batch objects,
  ``state_dict()`` / ``load_state_dict()``, ``bad_samples``
* :func:`build_demo_data` -> :class:`DemoData` (spec, tokenizer dir, held-out eval set)
"""
from .blend import Blend, build_blend, format_report
from .demo import DemoData, build_demo_data
from .loader import BadSampleCounter, BlendLoader, LoaderConfig, load_pair_eval_set, load_tokenizer
from .shards import DataSpecError, write_corpus

__all__ = ["Blend", "build_blend", "format_report", "DemoData", "build_demo_data", "BadSampleCounter",
           "BlendLoader", "LoaderConfig", "load_pair_eval_set", "load_tokenizer", "DataSpecError", "write_corpus"]
