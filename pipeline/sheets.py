"""For people: a contact sheet (one PNG grid per job: a row per prompt, a column per seed, captioned) and an
HTML page per job linking every image with its prompt and concepts. Both are rebuilt from the render index
on every run, so they always show the whole job, not just the last run's rows."""

from __future__ import annotations

import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipeline.store import Store

CELL = 128  # pixels per image in the sheet (small renders are scaled up, without smoothing)
MAX_PROMPTS = 100  # rows of a sheet: a catalog-sized job is browsed in its HTML page, which lists every image
CAPTION = 260  # width of the caption column
PAD = 6


def sheet_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows a contact sheet shows: those of its first MAX_PROMPTS prompts (only their images are read)."""
    shown = set(list(dict.fromkeys(r["prompt"] for r in rows))[:MAX_PROMPTS])
    return [r for r in rows if r["prompt"] in shown]


def contact_sheet(
    rows: Sequence[Mapping[str, Any]], images: Mapping[str, bytes], title: str, total: int | None = None
) -> bytes:
    """PNG bytes of the grid: rows = prompts in plan order, columns = seeds. `total`: the job's image count
    when `rows` is a part of it (sheet_rows)."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    by_cell = {(r["prompt"], int(r["seed"])): r for r in rows}
    font = ImageFont.load_default()
    header = 36
    width = CAPTION + len(seeds) * (CELL + PAD) + PAD
    height = header + len(prompts) * (CELL + PAD) + PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    shown = (
        f"{len(rows)} image(s)" if total in (None, len(rows)) else f"{len(rows)} of {total} images (all in the page)"
    )
    draw.text((PAD, 4), f"{title}: {shown}", fill="black", font=font)
    for column, seed in enumerate(seeds):
        draw.text((CAPTION + column * (CELL + PAD) + PAD, header - 14), f"seed {seed}", fill="gray", font=font)
    for line, prompt in enumerate(prompts):
        top = header + line * (CELL + PAD)
        names = next(json.loads(r["concept_names"]) for r in rows if r["prompt"] == prompt)
        caption = _wrap(prompt, 38) + ([f"[{', '.join(names)}]"] if names else [])
        draw.multiline_text((PAD, top + 4), "\n".join(caption), fill="black", font=font, spacing=3)
        for column, seed in enumerate(seeds):
            row = by_cell.get((prompt, seed))
            if row is None:
                continue
            with Image.open(io.BytesIO(images[row["render_id"]])) as picture:
                tile = picture.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            sheet.paste(tile, (CAPTION + column * (CELL + PAD) + PAD, top))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def html_page(job: str, rows: Sequence[Mapping[str, Any]], store: Store) -> str:
    """A self-contained page next to the sheet (renders/sheets/), linking images by relative path."""
    lines = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(job)}</title>",
        "<style>body{font-family:sans-serif} td{padding:4px;vertical-align:top} "
        "img{width:128px;image-rendering:pixelated}</style></head><body>",
        f"<h1>{html.escape(job)}</h1><p><img src='{html.escape(job)}.png' style='width:auto'></p>",
        "<table><tr><th>image</th><th>prompt</th><th>concepts</th><th>seed</th><th>render_id</th></tr>",
    ]
    for row in rows:
        image = html.escape("../" + store.locate(row["image_uri"]).split("/", 1)[1])  # renders/<id>.png
        names = ", ".join(json.loads(row["concept_names"]))
        lines.append(
            f"<tr><td><a href='{image}'><img src='{image}' alt='{html.escape(row['prompt'])}'></a></td>"
            f"<td>{html.escape(row['prompt'])}</td><td>{html.escape(names)}</td><td>{row['seed']}</td>"
            f"<td><code>{row['render_id']}</code></td></tr>"
        )
    lines.append("</table></body></html>")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current] if current else lines
