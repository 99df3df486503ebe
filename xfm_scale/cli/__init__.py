"""The command-line tools' main functions (console entry points in pyproject.toml; tools/*.py and
launchers/*.py are thin wrappers over them)."""
