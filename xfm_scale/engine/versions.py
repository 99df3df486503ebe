"""The DeepSpeed and megatron-core versions xfm_scale is tested with, checked at start-up.

The engine package works around DeepSpeed 0.19.8's and megatron-core 0.16.1's private internals
(:mod:`xfm_scale.engine.internals` lists them). Another patch release is run with a warning;
another minor or major release is refused, because a renamed internal could silently undo a
workaround (stale gradients, lost optimizer state), unless ``XFM_ALLOW_UNTESTED_STACK=1`` is set,
which turns the refusal into a warning. Every internal the workarounds read is still checked
where it is used (:func:`xfm_scale.engine.internals.require`).
"""
from __future__ import annotations

import os
import warnings
from importlib import metadata

TESTED = {"deepspeed": "0.19.8", "megatron-core": "0.16.1"}
"""The versions every workaround in this package was written and tested against."""
ALLOW_ENV = "XFM_ALLOW_UNTESTED_STACK"
"""Set to 1 to run a minor or major version other than the tested one, with a warning."""


class UntestedStackError(RuntimeError):
    """An installed DeepSpeed or megatron-core of another minor or major version than the tested one."""


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_versions(found: dict[str, str | None] | None = None) -> list[str]:
    """Compare the installed versions with :data:`TESTED`; returns the differences found.

    Same major.minor, other patch: a warning. Other major.minor: :class:`UntestedStackError`
    naming both versions and the way out, unless ``XFM_ALLOW_UNTESTED_STACK=1`` (then a warning)."""
    found = found if found is not None else {name: installed(name) for name in TESTED}
    differences, refused = [], []
    for name, tested in TESTED.items():
        have = found.get(name)
        if have is None or have == tested:
            continue
        line = f"{name} {have} is installed; xfm_scale is tested with {name}=={tested}"
        differences.append(line)
        if _release(have)[:2] != _release(tested)[:2]:
            refused.append(line)
    if refused and os.environ.get(ALLOW_ENV) != "1":
        raise UntestedStackError(
            "; ".join(refused) + f". xfm_scale works around that version's private internals, which another "
            f"release may have renamed; install the tested versions (pip install -r requirements.txt), or set "
            f"{ALLOW_ENV}=1 to run anyway")
    for line in differences:
        warnings.warn(line + " (the engine's workarounds may not apply; see xfm_scale/engine/)", stacklevel=2)
    return differences
