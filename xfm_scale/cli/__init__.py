"""The command-line tools' main functions (console entry points in pyproject.toml; tools/*.py and
launchers/*.py are thin wrappers over them).

Importing any of them silences the known, harmless start-up noise first (xfm_scale.quiet): a tool's
output is for a person, and its errors (``error: ...``, exit 2) should be the first thing read.
"""
from xfm_scale.quiet import silence_known_noise

silence_known_noise()
