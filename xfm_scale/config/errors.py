"""The error every configuration check raises (the launchers turn it into exit 2)."""


class ConfigError(ValueError):
    """A configuration error whose message says what to change."""
