"""A small folder of captioned images as a user has one: coloured shapes in the Hugging Face
imagefolder layout, each captioned in `metadata.jsonl` ("a red circle")."""

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square")


def make_folder(root: Path) -> Path:
    """24 images per shape, imagefolder layout with metadata.jsonl captions ("a red circle")."""
    root.mkdir(parents=True)
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for variant in range(6):
                image = Image.new("RGB", (24, 24), "white")
                draw = ImageDraw.Draw(image)
                box = (3 + variant % 3, 3 + variant // 3, 19 + variant % 3, 19 + variant // 3)
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
                name = f"{colour}-{shape}-{variant}.png"
                image.save(root / name)
                lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


