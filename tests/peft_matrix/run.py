"""PEFT's own test matrix as tying's conformance suite for TyingConfig.

Fetches the source distribution of the installed PEFT (its tests ship there; cached under ~/.cache/tying/peft-tests),
copies ``tests/test_custom_models.py`` and its helpers into a scratch folder, swaps its case tables for the TyingConfig
rows of ``rows.py`` (so only tying's rows run), and runs ``TestPeftCustomModel`` and ``TestMultipleActiveAdapters``.
Tests that assume LoRA's internals by name (``rows.EXPECTED``) are marked expected to fail, with the reason.

    python tests/peft_matrix/run.py [--out DIR] [--peft VERSION] [-- extra pytest arguments]

``--peft VERSION`` runs it on another PEFT release, installed (without dependencies) into the cache and put first on
the path.

Writes ``DIR/summary.json`` (counts and every failure) and exits 1 when any test fails that is not expected to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("TYING_CACHE", Path.home() / ".cache" / "tying")) / "peft-tests"
FILES = ("__init__.py", "testing_common.py", "testing_utils.py", "test_custom_models.py")
CLASSES = ("TestPeftCustomModel", "TestMultipleActiveAdapters")

CONFTEST = '''
import sys, types
import pytest
sys.path.insert(0, {here!r})
import tying  # noqa: F401  (the TYING method; PEFT learns it on import anyway where tying is installed)
from rows import EXPECTED

# testing_common imports diffusers for tests this matrix does not run
sys.modules.setdefault("diffusers", types.ModuleType("diffusers"))
sys.modules["diffusers"].StableDiffusionPipeline = object


def pytest_collection_modifyitems(items):
    for item in items:
        reason = EXPECTED.get(item.originalname)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
'''


def peft_tests(peft_version: str) -> Path:
    """The tests folder of PEFT ``peft_version``'s source distribution (downloaded once)."""
    folder = CACHE / f"peft-{peft_version}" / "tests"
    if (folder / "test_custom_models.py").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"peft=={peft_version}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("peft-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name and m.name.endswith(".py")]
            tar.extractall(tmp, members=members, filter="data")
        shutil.copytree(Path(tmp) / f"peft-{peft_version}" / "tests", folder)
    return folder


def patch(source: str) -> str:
    """test_custom_models.py with tying's rows in place of PEFT's, and tying's extra models known."""
    swaps = {
        "\nTEST_CASES = [": "\nfrom rows import MODELS as TYING_MODELS, TYING_CASES, TYING_MULTI_CASES\n"
                           "TEST_CASES = TYING_CASES or [",
        "\nMULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [": "\nMULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = TYING_MULTI_CASES or [",
        '        if model_id == "MLP":\n': '        if model_id in TYING_MODELS:\n'
                                         '            return TYING_MODELS[model_id]().to(dtype)\n'
                                         '        if model_id == "MLP":\n',
    }
    for old, new in swaps.items():
        if source.count(old) != 1:
            raise SystemExit(f"PEFT's test_custom_models.py changed: {old.strip()!r} is not there once; update run.py")
        source = source.replace(old, new)
    return source


def summarize(junit: Path) -> dict:
    """Counts and the failures from pytest's junit XML."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    failures = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        kids = {c.tag: c for c in case}
        skipped = kids.get("skipped")
        if "failure" in kids or "error" in kids:
            counts["failed"] += 1
            bad = kids.get("failure", kids.get("error"))
            failures.append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            counts["xfailed"] += 1
        elif skipped is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for summary.json and junit.xml (default: a temp)")
    ap.add_argument("--peft", default=None, help="a PEFT release to run on (default: the installed one)")
    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.peft and args.peft != version("peft"):
        return _on_other_peft(args.peft, argv)
    peft_version = version("peft")
    source = peft_tests(peft_version)
    out = args.out or Path(tempfile.mkdtemp(prefix="peft-matrix-"))
    work = out / "peft_tests"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in FILES:
        text = (source / name).read_text() if (source / name).is_file() else ""  # __init__.py: absent in some
        (work / name).write_text(patch(text) if name == "test_custom_models.py" else text)
    (work / "conftest.py").write_text(CONFTEST.format(here=str(HERE)))
    junit = out / "junit.xml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    targets = [f"{work / 'test_custom_models.py'}::{c}" for c in CLASSES]
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                    "--rootdir", str(out), f"--junitxml={junit}", *targets, *extra], cwd=out, env=env, check=False)
    summary = {"peft": peft_version, **summarize(junit)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["counts"]), f"(peft {peft_version}; {out / 'summary.json'})")
    return 1 if summary["counts"]["failed"] else 0


def _on_other_peft(peft_version: str, argv) -> int:
    """Run this script again with PEFT ``peft_version`` (installed once into the cache) first on the path."""
    target = CACHE / f"peft-{peft_version}-site"
    if not (target / "peft").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"peft=={peft_version}"], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    argv = list(sys.argv[1:] if argv is None else argv)
    i = argv.index("--peft")
    del argv[i:i + 2]
    return subprocess.run([sys.executable, __file__, *argv], env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
