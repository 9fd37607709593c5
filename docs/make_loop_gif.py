"""Make ``docs/loop.gif``, the README's picture of the whole loop, from the screenshots in
docs/ (made by make_screenshots.py and make_loop_screenshots.py): one frame per step, each
with a caption. Run after the screenshots: ``.venv/bin/python docs/make_loop_gif.py``."""

from __future__ import annotations

from pathlib import Path

from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

DOCS = Path(__file__).parent
WIDTH = 960
STEPS = [  # (screenshot, caption)
    ("annotate", "1  Annotate: keys 1-9 put the slice in view into a class folder"),
    ("train-curves", "2  Train: pretrained EfficientNet, live curves, Stop at any time"),
    ("train-report", "3  Test report: images never used in training, confusion matrix"),
    ("predict", "4  Predict: class and confidence follow the slider through a stack"),
    ("gradcam", "5  Explain: where the model looks (Grad-CAM)"),
    ("review", "6  Review errors: a confusion-matrix cell opens as a stack; fix labels"),
    ("label-next", "7  Label next: the pages the model is least sure about; Retrain"),
]


def frame(name: str, caption: str, font) -> Image.Image:
    shot = Image.open(DOCS / f"{name}.png").convert("RGB")
    shot = shot.resize((WIDTH, round(shot.height * WIDTH / shot.width)), Image.LANCZOS)
    band = 44
    out = Image.new("RGB", (WIDTH, shot.height + band), (38, 41, 48))
    out.paste(shot, (0, band))
    ImageDraw.Draw(out).text((14, band // 2), caption, fill=(240, 240, 240), font=font, anchor="lm")
    return out


def main() -> None:
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 22)
    frames = [
        frame(n, c, font).quantize(
            colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        for n, c in STEPS
    ]
    path = DOCS / "loop.gif"
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=2600, loop=0, optimize=True
    )
    print(f"{path}: {len(frames)} frames, {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
