"""Packaging: one version, `--version` on both entry points, install hints that name the distribution and its extras.

The built wheel itself (metadata, contents, a run from a new venv) is checked by ``make wheel-check``
(scripts/check_wheel.py), which ``.ci/run`` runs after the tests.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sdo
from sdo.app.cli import main
from sdo.errors import DISTRIBUTION, MissingExtraError

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = f"sdo {sdo.__version__} (shortcut-diffusion)"


def test_the_version_has_one_source():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == DISTRIBUTION == "shortcut-diffusion"
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sdo.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", sdo.__version__)


def test_installed_metadata_matches_the_source():
    try:
        installed = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DISTRIBUTION} is not installed here (run from a source checkout)")
    origin = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json") or ""
    if ROOT.as_uri() not in origin:
        pytest.skip(f"the installed {DISTRIBUTION} is not this checkout")
    assert installed == sdo.__version__


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == EXPECTED


def test_python_dash_m_sdo_version():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "sdo", "--version"], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == EXPECTED


def test_missing_tensorboard_names_its_extra(tmp_path, monkeypatch):
    from sdo.app.finetuning import FinetuneConfig, finetune

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"pip install tensorboard .*pip install '\.\[tensorboard\]'"):
        finetune(FinetuneConfig(tensorboard=True, out=str(tmp_path / "run")))


def test_install_hints_name_the_distribution():
    """No hint tells users to `pip install sdo` (another project on the index) or `sdo[extra]`."""
    texts = [*ROOT.joinpath("src").rglob("*.py"), ROOT / "README.md", *ROOT.joinpath("docs").glob("*.md")]
    wrong = re.compile(r"pip install\s+['\"]?sdo\b|\bsdo\[(clip|train|dev|tensorboard)\]")
    offenders = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in texts for m in wrong.finditer(path.read_text())]
    assert not offenders
