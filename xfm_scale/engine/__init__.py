"""The only package that touches DeepSpeed's and megatron-core's private API.

* :mod:`.build`: the engine (:func:`.build.build_engine` returns an :class:`.build.Engine` whose
  ``step`` applies every per-step workaround);
* :mod:`.grads`: stale and NVMe-swapped gradients at the start of a step;
* :mod:`.checkpoint_io`: DeepSpeed's save and load, made safe and complete;
* :mod:`.full_state`: full (layout-free) tensors written into a live engine's partitions;
* :mod:`.memory`: pinned host memory for offload;
* :mod:`.optim`: the optimizer and schedule DeepSpeed wraps;
* :mod:`.safe_globals`: the one unpickling allow-list for DeepSpeed's checkpoint files;
* :mod:`.internals`: every private attribute the above reads, checked, not probed with defaults;
* :mod:`.versions`: the tested DeepSpeed and megatron-core versions, checked at start-up;
* :mod:`.megatron_compat`: the megatron layer override the model uses.

Each workaround names the version it works around and when to remove it. Importing this package
imports nothing heavy: :mod:`.safe_globals` and :mod:`.versions` are read by DeepSpeed-free code
(the checkpoint reader, the launcher's checks).
"""
