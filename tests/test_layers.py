"""Structural rules of ``src/sdo``: the two layers (the library, ``src/sdo/*.py``, never imports the applications,
``sdo.app``, or the zoo, and ``import sdo`` stays light), the defaults rule (no default argument value carries
mutable state) and the privacy rule (no module of ``src/sdo`` uses another module's underscore names)."""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


LIBRARY = [path for path in _modules(PACKAGE) + _modules(PACKAGE / "pipelines") if path.name not in SHIMS]


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


# The defaults rule (STYLE.md 14: "Defaults are immutable values, never instances that hold state"). A default
# argument value (of a def, async def or lambda anywhere in src/sdo) must be *deeply immutable*: None, bool, int,
# float, complex, str, bytes, range, an enum member, a torch.dtype / torch.device, a class, or a tuple / frozenset
# of such values, or an instance of a frozen dataclass all of whose field values are deeply immutable (the
# gradient modes ``sdo.Shortcut()`` etc.). A mutable display or comprehension ([], {}, {1}, [x for ...]) anywhere in
# a default fails without evaluating it; any other default is evaluated in its module's namespace (a default that
# cannot be, e.g. one reading an enclosing function's local, fails too) and its value is judged. So
# ``Invertible()`` fails: it is frozen, but its ``stats`` field is a mutable ``AdjointStats`` that every call using
# the default would share.
_MUTABLE_DISPLAYS = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp)
_IMMUTABLE_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    range,
    enum.Enum,
    torch.dtype,
    torch.device,
    type,
)


def _immutable(value) -> bool:
    """Whether ``value`` is deeply immutable (the defaults rule above)."""
    if isinstance(value, _IMMUTABLE_TYPES):
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(_immutable(item) for item in value)
    if dataclasses.is_dataclass(value) and type(value).__dataclass_params__.frozen:
        return all(_immutable(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


def _is_literal(node: ast.expr) -> bool:
    """A constant, a negated constant, or a tuple of literals: immutable without evaluating anything."""
    if isinstance(node, ast.Tuple):
        return all(_is_literal(item) for item in node.elts)
    if isinstance(node, ast.UnaryOp):
        return _is_literal(node.operand)
    return isinstance(node, ast.Constant)


def _default_violations(source: str, namespace) -> list[tuple[str, str]]:
    """``("line: default", why)`` for every default argument value of ``source`` that breaks the defaults rule;
    ``namespace()`` gives the module's globals (called only when a default needs evaluating)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for default in [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]:
            if _is_literal(default):
                continue
            text = f"{default.lineno}: {ast.unparse(default)}"
            if any(isinstance(part, _MUTABLE_DISPLAYS) for part in ast.walk(default)):
                found.append((text, "a mutable display"))
                continue
            try:
                value = eval(compile(ast.Expression(default), "<default>", "eval"), namespace())
            except NameError as error:
                found.append((text, f"not a module-level value: {error}"))
                continue
            if not _immutable(value):
                found.append((text, f"a {type(value).__name__}, which is not deeply immutable"))
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("sdo", *(parts[:-1] if parts[-1] == "__init__" else parts)))


@pytest.mark.parametrize("path", _modules(PACKAGE, recursive=True), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_default_argument_carries_mutable_state(path):
    bad = _default_violations(path.read_text(), lambda: vars(importlib.import_module(_module_name(path))))
    assert not bad, f"{path.relative_to(PACKAGE)}: default argument values that are not deeply immutable: {bad}"


def test_the_defaults_checker_tells_values_from_state():
    import sdo

    source = (
        "def f(a=[], b={}, c=set(), d=sdo.Invertible(), e=sdo.Adjoint(), g=(1, [2]), *, h=frozenset(), "
        "i=sdo.Shortcut(step='last'), j=sdo.Full(), k=(-1, 'x', None), l=torch.float64, m=CONSTANT, n=TABLE):\n"
        "    return lambda v, o=v: o\n"
    )
    namespace = {"sdo": sdo, "torch": torch, "CONSTANT": ("a", 2.0), "TABLE": {"a": 1}}
    bad = [text for text, _ in _default_violations(source, lambda: namespace)]
    assert bad == [
        "1: []",
        "1: {}",
        "1: set()",
        "1: sdo.Invertible()",
        "1: sdo.Adjoint()",
        "1: (1, [2])",
        "1: TABLE",
        "2: v",
    ]


# The privacy rule (STYLE.md 14: "No module reaches into another's private names. What two modules share is public in
# a third"). A private name is an identifier with one leading underscore (dunders are not private). A module of
# src/sdo *defines* the private names of its functions and classes (at any depth), of the assignments at module and
# class level, and of the attributes it assigns on ``self`` / ``cls``. In a module M of src/sdo, each of these is a
# violation:
#   1. ``from X import _name`` where X is another module of sdo (absolute or relative);
#   2. ``E._name`` where E is a name M imported from another module of sdo (a module: ``sched._x``; a class or any
#      other object: ``Sampler._check_range``);
#   3. ``E._name`` on any other expression but ``self`` and ``cls`` (e.g. an instance: ``sampler._check_range``,
#      ``self.sampler._check_range``) when ``_name`` is defined by another module of sdo and not by M.
# A module may itself be private (``sdo/_autograd.py``): its names carry no underscore and other modules import them;
# a private module is imported only inside sdo. Tests may use private names; third-party private names (diffusers'
# ``scheduler._step_index``) are outside the rule. ``getattr(obj, "_name")`` with a string is not seen.


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_private_names(tree: ast.Module) -> set[str]:
    """The private names a module defines (the privacy rule above)."""
    names = set()
    scopes = [tree]
    while scopes:
        scope = scopes.pop()
        for node in scope.body:
            targets = []
            if isinstance(node, ast.ClassDef):
                scopes.append(node)
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and _private(n.id))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
            names.update([node.attr] if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls") else [])
    return names


def _imported_from(node: ast.ImportFrom, module: str) -> str:
    """The absolute name of the module ``node`` (in ``module``) imports from."""
    package = module.removesuffix(".__init__") if module.endswith(".__init__") else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level else ""
    return ".".join(part for part in (base, node.module or "") if part)


def _privacy_violations(source: str, module: str, private_names: dict[str, set[str]]) -> list[str]:
    """``line: text`` for every use in ``source`` (the module ``module``, named like ``sdo.x``, or ``sdo.__init__``
    for a package) of another module's private name; ``private_names`` maps every module of sdo to the private names
    it defines."""
    tree = ast.parse(source)
    own = private_names.get(module, set())
    others = set().union(*(names for name, names in private_names.items() if name != module)) - own
    imported, found = {}, []  # local name -> the sdo module it comes from
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source_module = _imported_from(node, module)
            if source_module.split(".")[0] != "sdo" or source_module == module.removesuffix(".__init__"):
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{node.lineno}: from {source_module} import {alias.name}")
                submodule = f"{source_module}.{alias.name}"  # `from . import a` binds the module sdo.a
                imported[alias.asname or alias.name] = submodule if submodule in private_names else source_module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sdo":
                    imported[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in imported:
            found.append(f"{node.lineno}: {ast.unparse(node)} (a private name of {imported[base.id]})")
        elif not (isinstance(base, ast.Name) and base.id in ("self", "cls")) and node.attr in others:
            found.append(f"{node.lineno}: {ast.unparse(node)} (a private name of another module)")
    return sorted(set(found), key=lambda line: (int(line.split(":")[0]), line))


SOURCES = _modules(PACKAGE, recursive=True)


def _source_module(path: Path) -> str:
    """``sdo.x.y`` for ``sdo/x/y.py``, ``sdo.x.__init__`` for ``sdo/x/__init__.py`` (relative imports resolve
    from it)."""
    return ".".join(("sdo", *path.relative_to(PACKAGE).with_suffix("").parts))


@pytest.fixture(scope="module")
def private_names() -> dict[str, set[str]]:
    return {_source_module(path): _defined_private_names(ast.parse(path.read_text())) for path in SOURCES}


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_uses_another_modules_private_names(path, private_names):
    bad = _privacy_violations(path.read_text(), _source_module(path), private_names)
    assert not bad, f"{path.relative_to(PACKAGE)} uses private names of other sdo modules: {bad}"


def test_the_privacy_checker_sees_imports_attributes_and_instances():
    names = {"sdo.a": {"_helper", "_Class", "_method", "_state"}, "sdo.b": {"_own", "_method"}, "sdo.c": set()}
    source = (
        "import sdo.a as mod\n"
        "from . import a\n"
        "from .a import Class, _helper\n"
        "from ._autograd import graph_leaves\n"
        "from .b import _own\n"
        "def f(sampler, scheduler):\n"
        "    from sdo.a import _Class as alias\n"
        "    sampler._state, self._state, cls._helper\n"
        "    Class._method(), a._helper, mod._anything\n"
        "    scheduler._step_index, self.meter._own, self.meter._method\n"
    )
    assert _privacy_violations(source, "sdo.b", names) == [
        "3: from sdo.a import _helper",
        "7: from sdo.a import _Class",
        "8: sampler._state (a private name of another module)",
        "9: Class._method (a private name of sdo.a)",
        "9: a._helper (a private name of sdo.a)",
        "9: mod._anything (a private name of sdo.a)",
    ]
    assert _privacy_violations("from .a import _helper\n", "sdo.a", names) == []  # a module's own names
    assert _privacy_violations("from ..a import _helper\n", "sdo.app.x", names) == ["1: from sdo.a import _helper"]
    tree = ast.parse("_X = 1\nclass C:\n    _y: int = 0\n    def _m(self):\n        self._z = _local = 1\n")
    assert _defined_private_names(tree) == {"_X", "_y", "_m", "_z"}


# One of each (STYLE.md 13): the callables a user writes are typed once, in sdo/protocols.py. No other module of
# src/sdo defines (by class, def or assignment at module level) one of these names or the old alias ``Reward``; it
# imports them from ``sdo.protocols``.
PROTOCOL_NAMES = {"ModelFn", "LatentReward", "ImageReward", "Reward"}


def _module_level_definitions(tree: ast.Module) -> dict[str, int]:
    """Name -> line of every class, function and assignment target at the module level of ``tree``."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node.lineno
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                found[target.id] = node.lineno
    return found


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if p.name != "protocols.py"], ids=lambda path: str(path.relative_to(PACKAGE))
)
def test_protocols_are_defined_once(path):
    defined = _module_level_definitions(ast.parse(path.read_text()))
    bad = {name: line for name, line in defined.items() if name in PROTOCOL_NAMES}
    assert not bad, f"{path.relative_to(PACKAGE)} defines {bad}; import them from sdo.protocols"


def test_the_protocols_module_defines_them():
    defined = _module_level_definitions(ast.parse((PACKAGE / "protocols.py").read_text()))
    assert {"ModelFn", "LatentReward", "ImageReward"} <= set(defined)
    source = "Reward = Callable[[torch.Tensor, object], torch.Tensor]\nx: int = 1\nclass ModelFn: pass\n"
    assert _module_level_definitions(ast.parse(source)) == {"Reward": 1, "x": 2, "ModelFn": 3}
