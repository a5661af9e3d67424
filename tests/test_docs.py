"""README.md, docs/ and examples/README.md: every relative link (and #anchor) resolves, every path
named in backticks exists, every YAML spec shown is valid, the README stays short and starts with
the two commands that .ci/run executes."""

import re
from pathlib import Path

import pytest
import yaml

import tying

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
README_MAX_CHARS = 10_000

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
PATH = re.compile(r"`((?:benchmarks|docs|examples|integrations|tests|tying)/[^`\s]*)`")


def prose(page: Path) -> str:
    """The page without its fenced code blocks (links and paths inside code are not checked)."""
    return FENCE.sub("", page.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", prose(page), re.MULTILINE)}


def test_pages_exist():
    assert (ROOT / "docs" / "spec.md").is_file() and len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for link in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        file, _, anchor = link.partition("#")
        target = (page.parent / file).resolve() if file else page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_paths_in_backticks_exist(page):
    """Moved text keeps naming files (result folders, scripts): they must still be there."""
    missing = []
    for path in PATH.findall(prose(page)):
        if any(c in path for c in "{*<["):
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{page.relative_to(ROOT)} names missing files {missing}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text()) <= README_MAX_CHARS


def test_readme_starts_with_the_two_ci_commands():
    """.ci/run executes the README's first two ```bash blocks: set-up plus the main job, then the tests."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert len(blocks) >= 2
    setup, tests = blocks[0], blocks[1]
    assert setup.startswith("python3 -m venv .venv") and 'pip install -c constraints.txt -e ".[all]"' in setup
    locked = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {"torch", "torchvision", "peft", "transformers", "pydantic"} <= locked  # the set CI tested, pinned
    assert "benchmarks/paper_params.py" in setup and "benchmarks/reproduce.py benchmarks/configs/quick.yaml" in setup
    assert tests.strip() == ". .venv/bin/activate && python -m pytest -q"


def yaml_specs():
    for page in PAGES:
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", page.read_text(), re.DOTALL)):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "adapter" in data:
                yield pytest.param(data, id=f"{page.relative_to(ROOT).as_posix()}-{i}")


@pytest.mark.parametrize("data", list(yaml_specs()))
def test_yaml_specs_shown_in_the_docs_are_valid(data):
    spec = tying.load_spec(data)
    assert spec.adapter.factors


def test_the_readme_and_docs_show_specs():
    assert len(list(yaml_specs())) >= 2  # the README's quick start and the spec reference


def test_presets_in_the_readme_table_exist():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Presets"):text.index("## Results")]
    named = re.findall(r"^\| `([\w-]+)`(?: = `([\w-]+)`)?", table, re.MULTILINE)
    assert len(named) >= 4
    assert {n for pair in named for n in pair if n} <= set(tying.preset_names())


def test_every_example_has_a_script_and_is_listed():
    listing = (ROOT / "examples" / "README.md").read_text()
    specs = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(specs) >= 5
    for spec in specs:
        assert spec.with_suffix(".py").is_file(), f"{spec.name} has no script"
        assert f"]({spec.name})" in listing and f"]({spec.stem}.py)" in listing, f"{spec.name} is not listed"


def test_the_code_map_names_every_module():
    """docs/design.md's code map names every module of the core and of the integrations (by file name)."""
    text = (ROOT / "docs" / "design.md").read_text()
    cmap = text[text.index("## Code map"):]
    cmap = cmap[:cmap.index("\n## ", 1)]
    files = [*(ROOT / "tying").rglob("*.py"), *(ROOT / "integrations").rglob("*.py")]
    missing = [str(p.relative_to(ROOT)) for p in files if p.name not in cmap and p.parent.name != "kinds"]
    assert not missing, f"docs/design.md's code map does not name {missing}"
