"""Build the wheel, install it into a new virtual environment beside this machine's torch, and run ``sdo`` from there.

``make wheel-check`` runs it (and ``.ci/run`` runs that). It proves what the editable install in ``.venv`` cannot:

1. the wheel's metadata: the distribution name ``shortcut-diffusion``, the version ``sdo.__version__``, an SPDX license
   with its file, a torch requirement that is a range, and the ``sdo`` console script;
2. every file under ``src/sdo`` (modules, shipped weights, quality figures) is in the wheel;
3. in a new venv (no system site-packages) that already has the torch of ``--constraints`` (this interpreter's,
   symlinked, when it is the pinned version; else installed from the constraints), installing the wheel
   (without the constraints) installs no torch (pip's ``--report``) and leaves ``torch.__version__`` as it was;
4. from that venv, with the working directory outside the checkout: ``sdo --version``, ``python -m sdo --version``,
   every module of the package imports, ``sdo demo --help``, and a 2-iteration ``sdo optimize`` writes its files.

The other dependencies come from the package index (pip's cache on a machine that has run ``make`` before).
Standard library only. Exit status 0 when every check passes; the first failure is one line on stderr, status 1.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "shortcut-diffusion"
# What the build needs from the checkout; everything else (tests, docs, .venv) stays out of the wheel's build.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "src")
SHM_NEEDS = 4 * 2**30
"""Free bytes /dev/shm must have to hold the check's folder (wheel and venv: about 0.6 GB) with room to spare."""


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def run(args: list, *, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> str:
    """Run a command; its stdout, or CheckFailed naming the command and the end of its output."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise CheckFailed(f"`{' '.join(str(a) for a in args)}` exited {done.returncode}:\n{tail}")
    return done.stdout


def source_version() -> str:
    """``sdo.__version__`` as written in src/sdo/__init__.py (read, not imported)."""
    tree = ast.parse((ROOT / "src/sdo/__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise CheckFailed("src/sdo/__init__.py assigns no __version__")


def build_wheel(work: Path) -> tuple[Path, str]:
    """Build from a copy of the build inputs, so no stale build/ folder leaks into the wheel; the wheel, the log."""
    copy = work / "source"
    copy.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, copy / name)
    log = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", work / "dist", copy])
    wheels = sorted((work / "dist").glob("*.whl"))
    check(len(wheels) == 1, f"expected one wheel, found {[w.name for w in wheels]}")
    return wheels[0], log


def check_contents(wheel: Path, version: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"shortcut_diffusion-{version}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    fields = [tuple(line.split(": ", 1)) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line]
    check(("Name", DISTRIBUTION) in fields, f"METADATA names no `Name: {DISTRIBUTION}`")
    check(("Version", version) in fields, f"METADATA's version is not sdo.__version__ ({version})")
    check(("License-Expression", "Apache-2.0") in fields, "METADATA has no `License-Expression: Apache-2.0`")
    check(f"{info}/licenses/LICENSE" in names, "the wheel lacks the LICENSE file")
    torch_requirements = [value for key, value in fields if key == "Requires-Dist" and re.match(r"torch\b", value)]
    check(len(torch_requirements) == 1, f"expected one torch requirement, got {torch_requirements}")
    check(
        ">=" in torch_requirements[0] and "==" not in torch_requirements[0],
        f"torch requirement is not a range: {torch_requirements[0]}",
    )
    check(re.search(r"^sdo = sdo\.app\.cli:main$", entry_points, re.M) is not None, "no `sdo` console script")
    shipped = {
        path.relative_to(ROOT / "src").as_posix()
        for path in (ROOT / "src/sdo").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    missing = sorted(shipped - names)
    check(not missing, f"files under src/sdo missing from the wheel: {missing}")
    print(f"  metadata: {DISTRIBUTION} {version}, {torch_requirements[0]}, License-Expression: Apache-2.0")
    print(f"  contents: all {len(shipped)} files under src/sdo are in the wheel")


def torch_version(python: Path) -> str:
    return run([python, "-c", "import torch; print(torch.__version__)"]).strip()


def pinned_torch(constraints: Path) -> str | None:
    """The exact torch version ``constraints`` pins (``torch==X``), if it pins one."""
    for line in constraints.read_text().splitlines():
        if match := re.fullmatch(r"\s*torch\s*==\s*([^\s;#]+)\s*(#.*)?", line):
            return match.group(1)
    return None


def link_pinned_torch(python: Path, constraints: Path) -> bool:
    """Symlink this interpreter's torch (the top-level folders of its distribution, dist-info included) into the new
    venv when it is the version ``constraints`` pins, so that pip finds it installed and leaves it alone: copying
    754 MB of torch and byte-compiling it on the first import cost more than the rest of the install. pip never
    uninstalls it (the pin is met), so nothing under this interpreter's torch is touched. Returns whether it linked."""
    pin = pinned_torch(constraints)
    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    if pin is None or dist.version.split("+")[0] != pin.split("+")[0] or dist.files is None:
        return False
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    for top in sorted({f.parts[0] for f in dist.files if f.parts[0] != ".."}):
        source = Path(dist.locate_file(top))
        if source.exists():
            (site / top).symlink_to(source, target_is_directory=source.is_dir())
    return True


def check_install(work: Path, wheel: Path, constraints: Path, version: str) -> None:
    venv = work / "venv"
    # A new venv with nothing in it; this interpreter's pip installs into it (`pip --python`), which spares the
    # venv its own copy of pip.
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin/python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile"]
    step = time.perf_counter()
    linked = link_pinned_torch(python, constraints)
    # With torch linked, this only adds torch's own dependencies; else it installs torch as well.
    run([*pip, "-c", constraints, "torch"])
    before = torch_version(python)
    how = "linked from this interpreter's" if linked else "installed"
    seconds = time.perf_counter() - step
    print(f"  new venv {venv} with torch {before} ({how}, pinned in {constraints.name}) in {seconds:.1f} s")
    # The real install, without the constraints; its report lists what it installed, exactly as `--dry-run` would.
    step = time.perf_counter()
    report = work / "install.json"
    run([*pip, "--report", report, wheel])
    installed = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    check("torch" not in installed, f"installing the wheel changed torch to {installed.get('torch')}")
    check(torch_version(python) == before, f"installing the wheel changed torch from {before}")
    check(installed.get(DISTRIBUTION) == version, f"pip did not install {DISTRIBUTION} {version}: {installed}")
    seconds = time.perf_counter() - step
    print(f"  installed the wheel and {len(installed) - 1} dependencies in {seconds:.1f} s; torch untouched")

    # No PYTHONPATH: sdo must come from the venv. Bytecode may be written: pip installed none (--no-compile), so the
    # first command compiles what it imports, once, instead of every command compiling it again.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env["MPLBACKEND"] = "Agg"
    away = work / "elsewhere"  # outside the checkout: nothing can come from src/
    away.mkdir()
    sdo = venv / "bin/sdo"
    expected = f"sdo {version} ({DISTRIBUTION})"
    for command in ([sdo, "--version"], [python, "-m", "sdo", "--version"]):
        printed = run(command, cwd=away, env=env).strip()
        check(printed == expected, f"`{' '.join(map(str, command[1:]))}` printed {printed!r}, expected {expected!r}")
    probe = (
        "import importlib, importlib.metadata, pkgutil, sdo\n"
        "modules = [m.name for m in pkgutil.walk_packages(sdo.__path__, 'sdo.') if m.name != 'sdo.__main__']\n"
        "for name in modules: importlib.import_module(name)\n"
        f"assert importlib.metadata.version({DISTRIBUTION!r}) == sdo.__version__\n"
        "print(len(modules), sdo.__file__)\n"
    )
    count, location = run([python, "-c", probe], cwd=away, env=env).split()
    check(Path(location).is_relative_to(venv), f"sdo was imported from {location}, not from the venv")
    print(f"  {expected}; {count} modules import from {Path(location).parent}")
    check("--iters" in run([sdo, "demo", "--help"], cwd=away, env=env), "`sdo demo --help` shows no --iters")
    out = work / "optimize"
    started = time.perf_counter()
    run([sdo, "optimize", "--iters", "2", "--steps", "4", "--batch", "2", "--out", out], cwd=away, env=env)
    written = sorted(p.name for p in out.iterdir())
    for name in ("latent.safetensors", "grid.png", "curves.png", "metrics.json"):
        check(name in written, f"`sdo optimize` did not write {name} (wrote {written})")
    history = json.loads((out / "metrics.json").read_text())["history"]
    check(len(history) == 3, f"`sdo optimize --iters 2` recorded {len(history)} states, not the start and 2 more")
    seconds = time.perf_counter() - started
    print(f"  sdo demo --help ok; sdo optimize (2 iterations, shipped weights) ok in {seconds:.1f} s")


def work_parent() -> str | None:
    """Where the temporary folder goes: ``/dev/shm`` (memory) when it has room and ``TMPDIR`` is unset, else the
    system's temporary folder. On a disk mounted with ``discard`` (this project's CPU machines) removing the new
    venv's ~1.2 GB took 113 s of a 265 s check, since every freed block is trimmed as it is removed; in memory it is
    instant."""
    shm = Path("/dev/shm")
    if "TMPDIR" in os.environ or not shm.is_dir() or not os.access(shm, os.W_OK):
        return None
    return str(shm) if shutil.disk_usage(shm).free >= SHM_NEEDS else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", default="constraints/cpu.txt", help="torch for the new venv comes from here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (wheel, venv) and print it")
    args = parser.parse_args(argv)
    constraints = (ROOT / args.constraints).resolve()
    work = Path(tempfile.mkdtemp(prefix="sdo-wheel-check-", dir=work_parent()))
    started = time.perf_counter()
    try:
        version = source_version()
        step = time.perf_counter()
        wheel, log = build_wheel(work)
        warnings = sorted({line.strip() for line in log.splitlines() if "Deprecat" in line or "Warning" in line})
        print(f"built {wheel.name} in {time.perf_counter() - step:.1f} s" + "".join(f"\n  {w}" for w in warnings))
        check_contents(wheel, version)
        step = time.perf_counter()
        check_install(work, wheel, constraints, version)
        print(f"installed and ran in {time.perf_counter() - step:.1f} s")
    except (CheckFailed, subprocess.TimeoutExpired) as error:
        print(f"wheel check failed: {error}", file=sys.stderr)
        return 1
    finally:
        step = time.perf_counter()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    removing = time.perf_counter() - step
    print(f"wheel check passed in {time.perf_counter() - started:.1f} s ({removing:.1f} s of it removing {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
