"""The install maps calib/, turbo/ and cli/ into the one lmcompress namespace, and lists every subpackage."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def test_every_source_package_is_listed_in_setup_cfg():
    options = _setup_cfg()["options"]
    listed = set(options["packages"].split())
    mapping = dict(line.split(" = ") for line in options["package_dir"].strip().splitlines())
    on_disk = set()
    for import_name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([import_name, *relative.parts]))
    assert on_disk <= listed, f"add to setup.cfg [options] packages: {sorted(on_disk - listed)}"


@pytest.mark.parametrize("name", ["cli", "calib", "turbo"])
def test_no_top_level_module_besides_lmcompress(name, tmp_path):
    """What the install provides, seen from outside the source tree (pytest puts the repo root on sys.path)."""
    probe = (f"import importlib.util as u; print(u.find_spec('{name}') is None, "
             f"u.find_spec('lmcompress.{name}') is not None)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True"]
