"""megatron-core private API the model's layers rely on (megatron-core 0.16.1).

The model (:mod:`xfm_scale.model.layers`) imports its row-parallel linear layer from here, so
that the one override of a private megatron method lives beside the engine's DeepSpeed
workarounds, with its "remove when". This module imports no DeepSpeed and no model code.
"""
from __future__ import annotations

from megatron.core import tensor_parallel as tp


class RowParallelLinear(tp.RowParallelLinear):
    """megatron-core's RowParallelLinear, handing its own TP group to the matmul.

    megatron-core 0.16.1's ``RowParallelLinear.forward`` passes ``tp_group=None`` to its matmul
    function (the private ``_forward_impl``), which then looks the group up again and, on global
    rank 0, calls ``warnings.warn`` on every call. torch.compile cannot trace that call, so it broke
    a compiled block's graph at every row-parallel layer. The group it looks up is the one this
    layer already holds, so the result is the same.

    Remove when: megatron-core's forward passes ``self.tp_group`` itself (checked: not in 0.16.1).
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)
