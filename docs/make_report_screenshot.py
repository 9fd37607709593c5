"""Regenerate ``docs/report-html.png``: a model's ``report.html`` rendered by headless Chromium.

    python docs/make_report_screenshot.py [MODEL]

Without MODEL: the sample dataset, a short two-phase training (EfficientNet-Lite0's ImageNet
weights, installed with microclf; top stage fine-tuned, so the curves show the phase marker;
short and at a low learning rate, so that some test images are misclassified) in a temporary
folder. Needs ``chromium`` (Debian: ``apt-get install chromium``) on the PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).parent
BACKGROUND = (244, 245, 247)  # the page's background around <main>


def train_sample(root: Path) -> Path:
    from napari_microclf.core.sample import write_sample
    from napari_microclf.core.train import TrainConfig, train

    data = write_sample(root, n_per_class=40, size=96, seed=0)["dataset"]
    # a short training at a low learning rate, so that the report has mistakes to show
    result = train(
        TrainConfig(
            str(data),
            str(root / "model"),
            image_size=96,
            epochs=5,
            batch_size=16,
            backbone="efficientnet-lite0",
            weights="auto",
            fine_tune=1,
            head_epochs=3,
            learning_rate=1e-4,
            seed=0,
        ),
        on_update=lambda u: print(u.text) if hasattr(u, "line") else None,
    )
    return result.bundle


def screenshot(html: Path, out: Path, width: int = 1200, height: int = 3600) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    raw = out.with_suffix(".raw.png")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={raw}",
            f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
    )
    img = np.asarray(Image.open(raw).convert("RGB"))
    rows = np.flatnonzero((img != BACKGROUND).any(axis=(1, 2)))
    Image.fromarray(img[: rows.max() + 12]).save(out, optimize=True)
    raw.unlink()
    print(f"{out}: {img[: rows.max() + 12].shape[1]} x {rows.max() + 12} px")


def main() -> None:
    from napari_microclf.core.report_html import write_report_html

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else train_sample(Path(tmp))
        html = write_report_html(bundle, Path(tmp) / "report.html")
        screenshot(html, DOCS / "report-html.png")


if __name__ == "__main__":
    main()
