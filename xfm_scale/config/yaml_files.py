"""Reading the YAML files users write (run configs, blend specs, sweep files) with one clear error."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, *, what: str, error: type[Exception], loader: type = yaml.SafeLoader) -> Any:
    """The parsed contents of ``path``; ``error`` naming ``what`` the file is and the fix when the
    file is missing or not YAML. Only safe loaders: a config file never constructs Python objects."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; fix the path")
    try:
        return yaml.load(path.read_text(), Loader=loader)
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML ({err}); fix its syntax") from None
