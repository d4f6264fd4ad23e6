"""Small builders the tests and the benches share: image folders with captions and TOML config files.

Plain PIL and text, no training code, so benches need nothing from tests/.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 80, 220), (40, 180, 60), (230, 210, 40), (150, 60, 200), (240, 140, 30)]


def make_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), caption: str | None = None,
                ext: str = ".png") -> Path:
    """`count` images of a coloured disc on grey, each with a .txt caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", size, (240, 240, 240))
        draw = ImageDraw.Draw(img)
        w, h = size
        colour = COLOURS[i % len(COLOURS)]
        draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
        img.save(folder / f"img{i:02d}{ext}")
        (folder / f"img{i:02d}.txt").write_text(caption or f"a shape, colour {i}, plain background")
    return folder


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\") + '"'


def write_config(path: Path, tables: dict, datasets: list[dict] | None = None) -> Path:
    """tables: {"model": {...}, ...}; datasets: [{"resolution": 64, "subsets": [{...}]}]."""
    lines = []
    for table, values in tables.items():
        if isinstance(values, dict):
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        else:
            lines.insert(0, f"{table} = {toml_value(values)}")
    for ds in datasets or []:
        lines.append("[[datasets]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in ds.items() if k != "subsets"]
        for sub in ds.get("subsets", []):
            lines.append("[[datasets.subsets]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
