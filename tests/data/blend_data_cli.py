"""The blend tool's main function (tools/blend_data.py is a thin wrapper over it)."""
from xfm_scale.cli.blend_data import main  # noqa: F401
