"""Contact sheets stay a browsable size on catalog-sized jobs; the HTML page still lists every image."""

from __future__ import annotations

import io
import json

from PIL import Image

from pipeline.sheets import CELL, MAX_PROMPTS, PAD, contact_sheet, html_page, sheet_rows
from pipeline.store import Store


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_big_job_shows_its_first_prompts_and_the_page_lists_every_image(tmp_path):
    store = Store(str(tmp_path))
    rows = [
        {
            "render_id": f"r{p}-{s}",
            "prompt": f"prompt {p}",
            "seed": s,
            "concept_names": json.dumps(["mug"]),
            "image_uri": store.uri(f"renders/r{p}-{s}.png"),
        }
        for p in range(MAX_PROMPTS + 50)
        for s in range(2)
    ]
    shown = sheet_rows(rows)
    assert len(shown) == 2 * MAX_PROMPTS and {r["prompt"] for r in shown} == {f"prompt {p}" for p in range(MAX_PROMPTS)}
    images = {r["render_id"]: png((200, 0, 0)) for r in shown}  # only the shown rows' images are needed
    sheet = Image.open(io.BytesIO(contact_sheet(shown, images, title="big", total=len(rows))))
    assert sheet.height == 36 + MAX_PROMPTS * (CELL + PAD) + PAD
    assert sheet.getpixel((sheet.width - PAD - 1 - CELL // 2, 36 + CELL // 2)) == (200, 0, 0)
    page = html_page("big", rows, store)
    assert page.count("<tr><td>") == len(rows) == 300
    assert "<a href='../r0-0.png'>" in page
