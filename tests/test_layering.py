"""libs/ is below services/: no module under libs/ imports from services/."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _services_imports(path: Path) -> set[str]:
    """The ``services.<package>`` names a file imports, at any depth (function-level included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "services":
            names = [f"services.{a.name}" for a in node.names]  # from services import scheduler
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "services":
                found.add(".".join(parts[:2]))
    return found


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
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith(("libs.protocol", "libs.scheduler")), \
                    f"{p.relative_to(ROOT)} imports {name}"
