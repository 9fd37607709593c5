"""scripts/release_metadata.py: the README and the package metadata as PyPI and the napari hub
show them (absolute images and links, project URLs), made from the repository's files."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import release_metadata as rm  # noqa: E402

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

REPO = "https://github.com/example-lab/napari-microclf"


def test_every_file_the_readme_names_exists():
    targets = rm.relative_targets((ROOT / "README.md").read_text(encoding="utf-8"))
    images = [t for t in targets if t.lower().endswith(rm.IMAGE_SUFFIXES)]
    assert len(images) >= 5, targets  # the hub page has pictures
    assert rm.missing_files(ROOT / "README.md") == []


def test_release_readme_has_only_absolute_images_and_links(tmp_path):
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for target in rm.relative_targets((ROOT / "README.md").read_text(encoding="utf-8")):
        (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / target, tmp_path / target)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "release_metadata.py"),
            "--repo",
            REPO,
            "--ref",
            "v1.2.3",
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    before = (ROOT / "README.md").read_text(encoding="utf-8")
    after = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert rm.relative_targets(after) == []
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", after)
    raw = "https://raw.githubusercontent.com/example-lab/napari-microclf/v1.2.3/"
    assert images and all(u.startswith(raw) for u in images), images
    # each absolute image is a file of the repository, in the order the README had them
    assert [u[len(raw) :] for u in images] == re.findall(r"!\[[^\]]*\]\(([^)\s]+)", before)
    assert f"({REPO}/blob/v1.2.3/docs/walkthrough.md)" in after
    # the rest of the text is unchanged
    assert re.sub(r"\]\([^)]*\)", "]()", after) == re.sub(r"\]\([^)]*\)", "]()", before)

    meta = tomllib.loads((tmp_path / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["urls"] == {
        "Bug Tracker": f"{REPO}/issues",
        "Documentation": f"{REPO}#readme",
        "Source Code": REPO,
        "User Support": rm.SUPPORT,
    }
    original = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    meta["project"].pop("urls")
    original["project"].pop("urls", None)
    assert meta == original


def test_urls_are_replaced_not_added_twice():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    once = rm.with_urls(text, rm.project_urls(REPO))
    twice = rm.with_urls(once, rm.project_urls(REPO + "2"))
    assert twice.count("[project.urls]") == 1
    assert tomllib.loads(twice)["project"]["urls"]["Source Code"] == REPO + "2"


def test_a_missing_image_stops_the_release(tmp_path):
    (tmp_path / "README.md").write_text("# x\n\n![gone](docs/gone.png)\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "release_metadata.py"),
            "--repo",
            REPO,
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "docs/gone.png" in out.stderr
    assert (tmp_path / "README.md").read_text() == "# x\n\n![gone](docs/gone.png)\n"
