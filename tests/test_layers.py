"""The two layers: the library (``src/sdo/*.py``) never imports the applications (``sdo.app``) or the zoo, and
``import sdo`` stays light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sdo"
SHIMS = {"finetuning.py", "__main__.py"}  # public old paths kept on purpose; they import sdo.app
HEAVY = ("peft", "accelerate", "matplotlib", "transformers")


def _imports(path: Path) -> set[str]:
    """Absolute names of every module the file ``path`` of the package imports."""
    return _imported_names(path.read_text(), ".".join(("sdo", *path.relative_to(PACKAGE).parent.parts)))


def _imported_names(source: str, package: str) -> set[str]:
    """Absolute names of every module ``source`` (a module of ``package``) imports, at any depth, relative imports
    resolved."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _modules(folder: Path, recursive: bool = False) -> list[Path]:
    return sorted((folder.rglob if recursive else folder.glob)("*.py"))


LIBRARY = [path for path in _modules(PACKAGE) if path.name not in SHIMS]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: path.name)
def test_library_module_imports_no_application_and_no_zoo(path):
    bad = sorted(name for name in _imports(path) if name.startswith(("sdo.app", "sdo.zoo")))
    assert not bad, f"{path.name} (library) imports {bad}"


@pytest.mark.parametrize("path", _modules(PACKAGE / "zoo"), ids=lambda path: path.name)
def test_zoo_imports_no_application(path):
    assert not [name for name in _imports(path) if name.startswith("sdo.app")]


def test_the_import_checker_sees_relative_and_nested_imports():
    source = "import sdo.zoo\ndef f():\n    from ..app import cli\n    from . import nets\n"
    assert {"sdo.zoo", "sdo.app", "sdo.app.cli", "sdo.zoo.nets"} <= _imported_names(source, "sdo.zoo")
    assert {"sdo.errors", "sdo.errors.ConfigError"} <= _imported_names("from .errors import ConfigError", "sdo")


def test_import_sdo_loads_no_application_and_no_heavy_extra():
    code = "import json, sys, sdo; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert not [m for m in loaded if m.startswith(("sdo.app", "sdo.zoo"))]
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]
    assert "sdo.gradients" in loaded and "sdo.sampling" in loaded


def test_public_names_of_the_application_layer_load_on_first_use():
    code = (
        "import sys, sdo; assert 'sdo.app.finetuning' not in sys.modules; "
        "from sdo.finetuning import load_adapter; "
        "assert sdo.finetune is sdo.app.finetuning.finetune; "
        "assert sdo.FinetuneConfig is sdo.app.finetuning.FinetuneConfig; "
        "assert sdo.finetuning.load_adapter is load_adapter"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
