"""The package's shape, checked: DeepSpeed's private API only inside xfm_scale/engine/, light
modules that import without DeepSpeed, no import cycles, a version check that warns or refuses,
and each checkout running its own code."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from harness import tool_env

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "xfm_scale"
# DeepSpeed (and megatron) private access: an underscore attribute of an engine / optimizer /
# swapper object, or the internals the engine package's workarounds read.
PRIVATE = re.compile(r"(engine|optimizer|zero|swapper|deepspeed)\w*\.(_[a-z]\w*)|\.checkpoint_engine|_hp_mapping|"
                     r"\.optimizer_swapper|\.grad_partitions_flat_buffer|\.fp32_partitioned_groups_flat|"
                     r"\.fp16_partitioned_groups_flat_numel|\.single_partition_of_fp32_groups|_forward_impl")


def python_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py") if "fixtures" not in p.parts)


def test_deepspeed_private_api_is_touched_only_inside_the_engine_package():
    hits = []
    for path in python_files("xfm_scale", "tools", "launchers", "benchmarks", "tests"):
        if path.is_relative_to(PACKAGE / "engine") or path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if PRIVATE.search(code):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "DeepSpeed/megatron private access outside xfm_scale/engine/:\n" + "\n".join(hits)


def test_the_private_access_check_would_catch_one():
    assert PRIVATE.search("flat = engine.optimizer._swappable_optimizer_subgroup(0)")
    assert PRIVATE.search("zero.grad_partitions_flat_buffer.zero_()")
    assert not PRIVATE.search("engine.step(batches)")
    assert not PRIVATE.search('flat = sd["single_partition_of_fp32_groups"]')  # a key of DeepSpeed's files


@pytest.mark.parametrize("module", ["xfm_scale.config", "xfm_scale.config.run", "xfm_scale.runfolder",
                                    "xfm_scale.data.spec", "xfm_scale.checkpoint.reader", "xfm_scale.engine.versions"])
def test_light_modules_import_without_deepspeed(module):
    code = f"import sys, {module}; print('deepspeed' in sys.modules, 'megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=tool_env(),
                         cwd=ROOT, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"], (module, out.stdout)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level and inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "xfm_scale.engine.build" in graph["xfm_scale.train.trainer"]  # the graph is really built
    assert "xfm_scale.model.xfm" in graph["xfm_scale.engine.build"]  # function-local imports count
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_model_code_knows_nothing_of_deepspeed():
    graph = import_graph()
    for path in (PACKAGE / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "deepspeed" for n in names), path
    model = {m for m in graph if m.startswith("xfm_scale.model")}
    reached = {t for m in model for t in graph[m]}
    assert reached <= model | {"xfm_scale.batch", "xfm_scale.config", "xfm_scale.config.model",
                               "xfm_scale.engine.megatron_compat"}, reached - model


def test_a_deepspeed_of_another_patch_release_warns_and_of_another_minor_is_refused(monkeypatch):
    from xfm_scale.engine import versions

    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    assert versions.check_versions(dict(versions.TESTED)) == []
    with pytest.warns(UserWarning, match=r"deepspeed 0\.19\.9 is installed; xfm_scale is tested with deepspeed==0\.19\.8"):
        versions.check_versions({**versions.TESTED, "deepspeed": "0.19.9"})
    with pytest.raises(versions.UntestedStackError, match=r"deepspeed 0\.20\.0 is installed.*XFM_ALLOW_UNTESTED_STACK=1"):
        versions.check_versions({**versions.TESTED, "deepspeed": "0.20.0"})
    with pytest.raises(versions.UntestedStackError, match=r"megatron-core 0\.17\.0rc1"):
        versions.check_versions({**versions.TESTED, "megatron-core": "0.17.0rc1"})
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match=r"deepspeed 0\.20\.0 is installed"):
        assert len(versions.check_versions({**versions.TESTED, "deepspeed": "0.20.0"})) == 1


def test_the_installed_stack_is_the_tested_one():
    from xfm_scale.engine import versions

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert versions.check_versions() == []


def test_each_checkout_imports_its_own_package(tmp_path):
    """Two checkouts on one machine share the environment scripts/bootstrap.sh builds (keyed by
    requirements.txt); each one's `make` commands must run its own xfm_scale, not the first's."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    seen = []
    for name in ("first", "second"):
        clone = tmp_path / name
        (clone / "scripts").mkdir(parents=True)
        (clone / "xfm_scale").mkdir()
        for file in ("Makefile", "requirements.txt", "scripts/bootstrap.sh"):
            shutil.copy2(ROOT / file, clone / file)
        (clone / "xfm_scale" / "__init__.py").write_text(f"CHECKOUT = {name!r}\n")
        env = {k: v for k, v in tool_env().items() if k != "PYTHONPATH"}
        out = subprocess.run(["make", "-s", "-C", str(clone), "which"], capture_output=True, text=True, env=env,
                             timeout=600, check=True)
        seen.append(out.stdout.strip().splitlines()[-1])
    assert seen == [str(tmp_path / "first" / "xfm_scale" / "__init__.py"),
                    str(tmp_path / "second" / "xfm_scale" / "__init__.py")]
