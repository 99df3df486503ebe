"""The launchers' one import of the package: when this checkout is not on the path (on any rank of
any node), exit 2 with the fix named instead of a traceback per rank."""
import importlib
import sys


def entry_point(module: str):
    """``module``'s ``main`` (``module`` is in xfm_scale.cli)."""
    try:
        return importlib.import_module(module).main
    except ModuleNotFoundError as err:
        if err.name != "xfm_scale":
            raise
        print(f"{err}: launch from the repository root with PYTHONPATH=$PWD exported, or pip install -e . there",
              file=sys.stderr)
        sys.exit(2)  # bad input, as for the entry point's own set-up errors
