"""Configuration: the model (presets, encoders, objectives) and the run (data, batch, optimiser,
training, parallel layout, DeepSpeed), typed and documented per field; dotted overrides."""
from xfm_scale.config.errors import ConfigError
from xfm_scale.config.model import (PRESETS, XFM_WEIGHTS, FusionEncoderConfig, ObjectiveConfig, TextEncoderConfig,
                                    TransformerConfig, VisionEncoderConfig, XFMConfig)

__all__ = ["PRESETS", "XFM_WEIGHTS", "ConfigError", "FusionEncoderConfig", "ObjectiveConfig", "TextEncoderConfig",
           "TransformerConfig", "VisionEncoderConfig", "XFMConfig"]
