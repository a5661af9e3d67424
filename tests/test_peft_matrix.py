"""PEFT's own test matrix (its tests/test_custom_models.py) with TyingConfig rows passes: on the installed PEFT in the
default suite (so CI's newest-releases leg runs it on the newest PEFT the range admits), and on the oldest release
TyingConfig supports as a slow test. See tests/peft_matrix/run.py; the first run downloads PEFT's source
distribution from the package registry (cached under ~/.cache/tying)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
from tying.integrations import peft as tp

RUN = Path(__file__).parent / "peft_matrix" / "run.py"


def _matrix(tmp_path, *args) -> dict:
    out = subprocess.run([sys.executable, str(RUN), "--out", str(tmp_path), *args, "--", "-k", "Tying", "-q"],
                         capture_output=True, text=True, timeout=1200, check=False)
    summary = tmp_path / "summary.json"
    if not summary.is_file():
        if "pip" in out.stderr and ("download" in out.stderr or "install" in out.stderr):
            pytest.skip(f"PEFT's sources could not be fetched from the package registry: {out.stderr[-300:]}")
        raise AssertionError(out.stdout[-2000:] + out.stderr[-3000:])
    return json.loads(summary.read_text())


@pytest.mark.skipif(tp._peft_version() < tp.MIN_PEFT, reason="TyingConfig needs peft >= 0.21")
def test_peft_s_matrix_passes_on_the_installed_peft(tmp_path):
    s = _matrix(tmp_path)
    assert s["counts"]["failed"] == 0, s["failures"][:5]
    assert s["counts"]["passed"] >= 700  # every row ran (14 rows x ~55 tests, 2 multi-adapter rows)


@pytest.mark.slow
def test_peft_s_matrix_passes_on_the_oldest_supported_peft(tmp_path):
    s = _matrix(tmp_path, "--peft", "0.21.0")
    assert s["peft"] == "0.21.0" and s["counts"]["failed"] == 0, s["failures"][:5]
    assert s["counts"]["passed"] >= 700
