"""Import layering: libs/ is below services/ (no module under libs/ imports from services/),
the scheduler core imports no lib but the protocol, and on the node side the imports point
one way: node process -> role handlers -> shared node pieces."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """The absolute module names a file imports, at any depth (function-level included);
    ``from a.b import c`` counts as ``a.b.c`` (c may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _services_imports(path: Path) -> set[str]:
    """The ``services.<package>`` names a file imports."""
    return {".".join(name.split(".")[:2]) for name in _imports(path) if name.startswith("services.")}


def test_libs_do_not_import_services():
    found = {(str(p.relative_to(ROOT)), mod)
             for p in sorted((ROOT / "libs").rglob("*.py")) for mod in _services_imports(p)}
    assert found == set(), sorted(found)


def test_the_check_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef f():\n    from services.gateway.app import create_app\n    import services.node\n"
                 "from services import scheduler\n")
    assert _services_imports(f) == {"services.gateway", "services.node", "services.scheduler"}


def test_scheduler_core_imports_only_the_protocol():
    """libs/scheduler runs in the service and in the simulator: no NATS, no engine, no other lib."""
    for p in sorted((ROOT / "libs" / "scheduler").rglob("*.py")):
        for name in _imports(p):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or name.startswith(("libs.protocol", "libs.scheduler")), \
                f"{p.relative_to(ROOT)} imports {name}"


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Per file of ``services/<package>``: the ``services.<package>`` names it imports."""
    return {str(p.relative_to(ROOT)): _services_imports(p) for p in sorted((ROOT / "services" / package).rglob("*.py"))}


def test_node_side_imports_point_one_way():
    """node process (services.node) -> role handlers (services.prefill, services.decode) -> shared
    (services.node_common): a handler imports neither the other handler nor the node process,
    and the shared package imports none of them."""
    forbidden = {
        "prefill": {"services.decode", "services.node"},
        "decode": {"services.prefill", "services.node"},
        "node_common": {"services.prefill", "services.decode", "services.node"},
    }
    for package, banned in forbidden.items():
        files = _imported_packages(package)
        assert files, package
        bad = {f: sorted(mods & banned) for f, mods in files.items() if mods & banned}
        assert bad == {}, bad
    node = _imported_packages("node")
    assert {"services.prefill", "services.decode", "services.node_common"} <= set().union(*node.values())
