"""Import shim: the tools/ CLIs as modules (tools/ is not a package)."""
import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "tools" / "blend_data.py"
_spec = importlib.util.spec_from_file_location("blend_data_tool", _path)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
main = _module.main
