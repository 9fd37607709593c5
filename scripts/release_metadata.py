"""Make README.md and pyproject.toml ready for PyPI and the napari hub, at release time.

PyPI and the napari hub show the README without the repository around it, so a relative
image (``docs/train-curves.png``) or link (``docs/walkthrough.md``) breaks there. In the
repository they stay relative (they work on GitHub, in a clone and offline); the release job
(``.github/workflows/test_and_deploy.yml``) runs this script on its checkout, which knows
the repository's address, before building the package:

    python scripts/release_metadata.py --repo https://github.com/OWNER/napari-microclf --ref v0.2.0

- every relative image in README.md becomes an absolute URL of that file at that ref (raw
  file for images, the file's page for other links); a missing file stops the release;
- ``[project.urls]`` (Bug Tracker, Documentation, Source Code, User Support) is written into
  pyproject.toml, as the napari hub lists them.

``--check`` only checks that every relative file the README names exists. Nothing is read
from or sent to the network.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target), target without spaces, optional "title"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")
IMAGE_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".svg", ".webp")
SUPPORT = "https://forum.image.sc/tag/napari"  # where napari users ask


def is_relative(target: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target, re.I)


def relative_targets(text: str) -> list[str]:
    """The relative files a README names (its images and its links), in order."""
    return [m.group(3).split("#")[0] for m in LINK.finditer(text) if is_relative(m.group(3))]


def missing_files(readme: Path) -> list[str]:
    root = readme.parent
    return [
        t for t in relative_targets(readme.read_text(encoding="utf-8")) if not (root / t).exists()
    ]


def file_urls(repo: str, ref: str) -> tuple[str, str]:
    """(raw file URL prefix, file page URL prefix) for ``repo`` at ``ref``."""
    repo = repo.rstrip("/")
    m = re.match(r"^https://github\.com/([^/]+/[^/]+)$", repo)
    raw = f"https://raw.githubusercontent.com/{m.group(1)}/{ref}" if m else f"{repo}/raw/{ref}"
    return raw, f"{repo}/blob/{ref}"


def absolute_readme(text: str, repo: str, ref: str) -> str:
    """``text`` with each relative image and link made absolute for ``repo`` at ``ref``."""
    raw, page = file_urls(repo, ref)

    def swap(m: re.Match) -> str:
        bang, label, target, title = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if not is_relative(target):
            return m.group(0)
        path = target.removeprefix("./")
        image = bang or path.split("#")[0].lower().endswith(IMAGE_SUFFIXES)
        return f"{bang}[{label}]({raw if image else page}/{path}{title})"

    return LINK.sub(swap, text)


def project_urls(repo: str) -> dict[str, str]:
    repo = repo.rstrip("/")
    return {
        "Bug Tracker": f"{repo}/issues",
        "Documentation": f"{repo}#readme",
        "Source Code": repo,
        "User Support": SUPPORT,
    }


def with_urls(pyproject: str, urls: dict[str, str]) -> str:
    """``pyproject`` with its ``[project.urls]`` table replaced by ``urls`` (added before
    the first table after ``[project]`` when there is none)."""
    table = "[project.urls]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in urls.items())
    old = re.search(r"^\[project\.urls\]\n(?:(?!\[).*\n)*", pyproject, re.M)
    if old:
        return pyproject[: old.start()] + table + "\n" + pyproject[old.end() :].lstrip("\n")
    project = re.search(r"^\[project\]\n", pyproject, re.M)
    if project is None:
        raise SystemExit("pyproject.toml has no [project] table")
    after = re.search(r"^\[", pyproject[project.end() :], re.M)
    at = project.end() + after.start() if after else len(pyproject)
    return pyproject[:at] + table + "\n" + pyproject[at:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", help="the repository's address, https://github.com/OWNER/NAME")
    ap.add_argument("--ref", default="main", help="tag or branch the URLs point at")
    ap.add_argument("--root", type=Path, default=ROOT, help="the project folder")
    ap.add_argument("--check", action="store_true", help="only check the README's files")
    args = ap.parse_args(argv)
    readme, pyproject = args.root / "README.md", args.root / "pyproject.toml"
    missing = missing_files(readme)
    if missing:
        print(f"{readme} names files that do not exist: {', '.join(missing)}", file=sys.stderr)
        return 1
    if args.check:
        print(
            f"{readme}: {len(relative_targets(readme.read_text(encoding='utf-8')))} "
            "relative files, all present"
        )
        return 0
    if not args.repo or not args.repo.startswith("https://"):
        ap.error("--repo https://... is needed (or --check)")
    readme.write_text(
        absolute_readme(readme.read_text(encoding="utf-8"), args.repo, args.ref), encoding="utf-8"
    )
    pyproject.write_text(
        with_urls(pyproject.read_text(encoding="utf-8"), project_urls(args.repo)), encoding="utf-8"
    )
    print(f"README.md and pyproject.toml point at {args.repo} ({args.ref})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
