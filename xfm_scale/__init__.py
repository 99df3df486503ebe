"""xfm_scale: DeepSpeed ZeRO-3 + megatron tensor-parallel pre-training of X-FM.

Public API::

    from xfm_scale import XFMConfig, build_model
    config = XFMConfig.from_preset("tiny")        # or "base", "large", "giant"
    model = build_model(config)                   # a world of one if nothing is initialised
    hidden_BLD = model.encode_text(input_ids, attention_mask)
    tokens_BND = model.encode_image(pixel_values)  # pooled vector at index 0
"""
from xfm_scale.config import PRESETS, ConfigError, XFMConfig

__all__ = ["XFMConfig", "ConfigError", "PRESETS", "build_model"]


def build_model(config: XFMConfig):
    """Build the X-FM model at the current tensor-parallel size (initialising a single-process
    world with TP=1 when no parallel state exists yet)."""
    from megatron.core import parallel_state as ps

    from xfm_scale import distributed
    from xfm_scale.model.xfm import XFM

    if not ps.model_parallel_is_initialized():
        distributed.initialize(tensor_parallel_size=1)
    return XFM(config)
