"""A plain (non-editable) install exposes tying.integrations and no top-level `integrations`, and puts the bridge that
teaches PEFT the TYING method (tying-bridges.pth) into site-packages."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_maps_integrations(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True)
    assert (target / "tying" / "integrations" / "__init__.py").is_file()
    assert (target / "tying" / "presets" / "presets.yaml").is_file()
    assert not (target / "integrations").exists()
    assert (target / "tying-bridges.pth").read_text().strip() == "import _tying_bridges; _tying_bridges.autoload()"
    assert (target / "_tying_bridges.py").is_file()  # stdlib only: what every start-up imports
    code = "import tying, tying.integrations; print(tying.integrations.__file__); print(len(tying.preset_names()))"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    path, n = out.stdout.split()
    assert Path(path).is_relative_to(target) and int(n) >= 12
