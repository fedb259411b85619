"""libs/ is below services/: no module under libs/ imports from services/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Known exceptions, each one file importing one services package. To be removed when the
# scheduler core moves to libs/ (the simulator then imports it from there).
ALLOWED = {
    ("libs/sim/cluster.py", "services.scheduler"),
}


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
    assert found - ALLOWED == set(), sorted(found - ALLOWED)
    assert ALLOWED - found == set(), f"no longer needed, drop from ALLOWED: {sorted(ALLOWED - found)}"


def test_the_check_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef f():\n    from services.gateway.app import create_app\n    import services.node\n"
                 "from services import scheduler\n")
    assert _services_imports(f) == {"services.gateway", "services.node", "services.scheduler"}
