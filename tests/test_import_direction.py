"""The layering rule: meshtui -> meshd -> codec. codec imports neither; neither imports textual."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    """Top-level module names imported anywhere in ``package`` (static, every import statement)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_codec_imports_neither_meshd_nor_meshtui_nor_textual():
    imports = imported_modules("codec")
    for forbidden in ("meshd", "meshtui", "textual", "rich"):
        assert forbidden not in imports, f"codec imports {forbidden} in {imports.get(forbidden)}"


def test_meshd_imports_neither_meshtui_nor_textual():
    imports = imported_modules("meshd")
    for forbidden in ("meshtui", "textual", "rich"):
        assert forbidden not in imports, f"meshd imports {forbidden} in {imports.get(forbidden)}"


def test_importing_the_daemon_loads_no_ui_library():
    """Checked at run time too: nothing pulls textual in transitively."""
    code = (
        "import sys, codec, meshd, meshd.cli\n"
        "bad = [m for m in ('textual', 'rich', 'meshtui') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "", f"importing meshd loaded {result.stdout.strip()}"


def test_no_pickle_in_product_code():
    for package in ("codec", "meshd", "meshtui"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "torch.load(" not in text, path
