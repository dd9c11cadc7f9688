"""Write the example catalog: manifests/catalog.yaml and the product photos beside it (no downloads), and
the same catalog as a product table: manifests/products.parquet and manifests/catalog-table.yaml.

    python manifests/make_catalog.py

The products are the toy world's personal concepts (perfusion/toyworld/world.py): shapes with their own
color, texture and mark that the toy base model never saw. Six photos each, on varied backgrounds, as a
product team would shoot them, with a soft mask per photo (255 on the product, 64 around it: the loss
weighs the product fully and the scene a quarter). The manifest does not use the masks: on the toy model
they cost the ring its hole (shape found in 6-38% of renders with them, 81-88% without; benchmarks/
RESULTS.md); add `masks: [catalog/<name>/masks/*.png]` to a concept to train with them. Deterministic:
rerunning rewrites the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perfusion.toyworld.world import PERSONAL_CONCEPTS, concept_images, concept_masks

HERE = Path(__file__).resolve().parent
PHOTOS = 6

HEADER = """\
# The example catalog: four products of the toy world, six photos each (written by make_catalog.py).
#   perfusion-batch validate manifests/catalog.yaml
#   perfusion-batch train manifests/catalog.yaml           # embedded Ray, results under manifests/store/
#   perfusion-batch concepts list --manifest manifests/catalog.yaml
version: 1
catalog: toy-catalog
root: ./store                  # relative to this file; --root or PERFUSION_BATCH_ROOT override it
base_model: toy                # the project's pretrained toy-world model (perfusion/assets/toy)
training:                      # defaults for every concept (perfusion.TrainConfig fields)
  steps: 400                   # the paper's budget; about a minute a concept on one CPU core
  batch_size: 8
  flip_probability: 0          # products have a side (a notch sits top-right): no mirrored copies
# Each product also has soft masks under catalog/<name>/masks/ (`masks:` per concept); unused here: on the
# toy model they cost the ring its hole (see make_catalog.py).
concepts:
"""
MASK_BACKGROUND = 0.25  # benchmarks/concept_quality.py --masks: cut-outs (0) let the color flood the scene

RENDERS = """\
renders:                       # perfusion-batch render manifests/catalog.yaml
  - name: new-scenes           # every product alone on two backgrounds (no product has their color)
    prompts:
      - "{a} on a yellow background"
      - "{a} on a white background"
    images_per_prompt: 2
    steps: 20
    guidance_scale: 4.0
  - name: pairs                # two products in one scene: every pair of the catalog
    prompts:
      - "{a} and {b} on a white background"
    images_per_prompt: 2
    steps: 20
    guidance_scale: 4.0
"""


def main() -> None:
    lines = [HEADER]
    for index, concept in enumerate(PERSONAL_CONCEPTS):
        folder = HERE / "catalog" / concept.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(exist_ok=True)
        for number, photo in enumerate(concept_images(concept, PHOTOS, seed=100 + index)):
            photo.save(folder / f"{number:02d}.png", optimize=True)
        masks = concept_masks(concept, PHOTOS, seed=100 + index, background=MASK_BACKGROUND)
        for number, mask in enumerate(masks):
            mask.save(folder / "masks" / f"{number:02d}.png", optimize=True)
        tags = ", ".join(f"{k}: {v}" for k, v in concept.tags.items())
        lines.append(
            f"  - name: {concept.name}\n"
            f"    superclass: {concept.superclass}\n"
            f"    images: [catalog/{concept.name}/*.png]\n"
            f"    tags: {{{tags}}}\n"
        )
    lines.append(RENDERS)
    (HERE / "catalog.yaml").write_text("".join(lines))
    write_product_table()
    print(f"wrote {HERE / 'catalog.yaml'}, {len(PERSONAL_CONCEPTS) * PHOTOS} photos and {HERE / 'products.parquet'}")


TABLE_MANIFEST = """\
# The example catalog again, its products read from a product table (a feed or PIM export) instead of listed
# here: manifests/products.parquet, one row a product, its columns mapped to concept fields. Same products,
# photos and training as catalog.yaml, so the same concept keys: after `train manifests/catalog.yaml` this
# catalog trains nothing new (written by make_catalog.py).
#   perfusion-batch validate manifests/catalog-table.yaml
version: 1
catalog: toy-catalog-table
root: ./store
base_model: toy
training: {steps: 400, batch_size: 8, flip_probability: 0}
concepts_from:
  table: products.parquet      # relative to this file; Parquet, CSV or a Delta table; any fsspec URI
  columns:                     # the table's column for each concept field
    name: slug
    superclass: category_word
    images: photos             # a list column of URIs or globs, relative to the table's folder
    tags: [sku, shelf]
"""


def write_product_table() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "slug": concept.name,
            "category_word": concept.superclass,
            "photos": [f"catalog/{concept.name}/{number:02d}.png" for number in range(PHOTOS)],
            "sku": concept.tags["sku"],
            "shelf": concept.tags["category"],
        }
        for concept in PERSONAL_CONCEPTS
    ]
    pq.write_table(pa.Table.from_pylist(rows), HERE / "products.parquet")
    (HERE / "catalog-table.yaml").write_text(TABLE_MANIFEST)


if __name__ == "__main__":
    main()
