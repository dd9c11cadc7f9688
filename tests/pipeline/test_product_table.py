"""`concepts_from:`: a catalog's products read from a product table (Parquet, CSV, Delta), every problem named
by the table, its row and its column, before anything trains."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.demo import PRODUCTS, product_images
from pipeline.manifest import ManifestError, load_manifest
from pipeline.plan import build_plan

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def photos(folder: Path, name: str, index: int) -> list[str]:
    """Three photos of a tiny-model product under folder/photos/<name>/, as table-relative paths."""
    (folder / "photos" / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for number, photo in enumerate(product_images(PRODUCTS[index % 2], count=3, seed=index)):
        photo.save(folder / "photos" / name / f"{number}.png")
        paths.append(f"photos/{name}/{number}.png")
    return paths


def write_manifest(folder: Path, concepts_from: str, inline: str = "") -> Path:
    manifest = folder / "catalog.yaml"
    manifest.write_text(
        textwrap.dedent(
            """\
            version: 1
            catalog: table-shop
            root: ./store
            base_model: tiny
            training: {steps: 4, batch_size: 2}
            """
        )
        + concepts_from
        + inline
    )
    return manifest


def products(folder: Path) -> list[dict]:
    return [
        {"slug": "mug", "kind": "mug", "pics": photos(folder, "mug", 0), "sku": "SKU-1", "steps": 6, "weight": 0.5},
        {"slug": "bag", "kind": "bag", "pics": photos(folder, "bag", 1), "sku": "SKU-2", "steps": None, "weight": 1.5},
    ]


COLUMNS = "  columns: {name: slug, superclass: kind, images: pics, tags: [sku, weight], training: {steps: steps}}\n"


def test_a_parquet_table_gives_the_concepts_an_inline_manifest_would(tmp_path):
    table = tmp_path / "feed" / "products.parquet"
    table.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(products(table.parent)), table)
    from_table = load_manifest(write_manifest(tmp_path, f"concepts_from:\n  table: feed/products.parquet\n{COLUMNS}"))
    feed = table.parent
    (tmp_path / "inline").mkdir()
    inline = load_manifest(
        write_manifest(
            tmp_path / "inline",
            "concepts:\n"
            f"  - {{name: mug, superclass: mug, images: ['{feed}/photos/mug/*.png'], tags: {{sku: SKU-1, weight: 0.5}},"
            " training: {steps: 6}}\n"
            f"  - {{name: bag, superclass: bag, images: ['{feed}/photos/bag/*.png'],"
            " tags: {sku: SKU-2, weight: 1.5}}\n",
        )
    )
    assert [(c.name, c.superclass, c.tags) for c in from_table.concepts] == [
        ("mug", "mug", {"sku": "SKU-1", "weight": 0.5}),
        ("bag", "bag", {"sku": "SKU-2", "weight": 1.5}),
    ]
    assert from_table.training_config(from_table.concepts[0])["steps"] == 6  # the row's override
    assert from_table.training_config(from_table.concepts[1])["steps"] == 4  # a null cell: the catalog's
    # The same products, photos and training as the inline manifest: the same concept keys (nothing retrains).
    keys = [item.concept_key for item in build_plan(from_table, "fp")]
    assert keys == [item.concept_key for item in build_plan(inline, "fp")]


def test_csv_and_delta_tables_with_inline_concepts_beside_them(tmp_path):
    rows = products(tmp_path)
    csv = tmp_path / "products.csv"
    lines = ["slug,kind,pics,sku"] + [f"{r['slug']},{r['kind']},photos/{r['slug']}/*.png,{r['sku']}" for r in rows]
    csv.write_text("\n".join(lines) + "\n")
    columns = "  columns: {name: slug, superclass: kind, images: pics, tags: [sku]}\n"
    inline = "concepts:\n  - {name: cup, superclass: cup, images: [photos/mug/0.png]}\n"
    manifest = load_manifest(write_manifest(tmp_path, f"concepts_from:\n  table: products.csv\n{columns}", inline))
    assert [c.name for c in manifest.concepts] == ["cup", "mug", "bag"]  # inline first, then the table's rows
    assert manifest.concepts[1].images == [str(tmp_path / "photos" / "mug" / "*.png")]  # from the table's folder
    assert manifest.concepts[2].tags == {"sku": "SKU-2"}

    write_deltalake(str(tmp_path / "feed-delta"), pa.Table.from_pylist(rows))
    delta = load_manifest(write_manifest(tmp_path, f"concepts_from:\n  table: feed-delta\n{COLUMNS}"))
    assert [c.name for c in delta.concepts] == ["mug", "bag"]

    result = runner.invoke(app, ["validate", str(tmp_path / "catalog.yaml")])
    assert result.exit_code == 0 and "mug <mug>: 3 image(s), would train" in result.output, result.output


def problems_of(tmp_path: Path, table_rows: list[dict], columns: str = COLUMNS, inline: str = "") -> list[str]:
    pq.write_table(pa.Table.from_pylist(table_rows), tmp_path / "products.parquet")
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(tmp_path, f"concepts_from:\n  table: products.parquet\n{columns}", inline))
    return [str(p) for p in error.value.problems]


def test_every_problem_names_the_table_row_and_column(tmp_path):
    rows = products(tmp_path)
    # Field problems first (as an inline concept's: nothing else is checked until every row parses) ...
    found = problems_of(tmp_path, [rows[0] | {"kind": None}, rows[1] | {"pics": []}])
    assert found[0] == "products.parquet row 1, column 'kind' (superclass): field required"
    assert found[1].startswith("products.parquet row 2, column 'pics' (images): list should have at least 1")
    assert len(found) == 2
    # ... then the rules across fields, rows and inline concepts.
    found = problems_of(
        tmp_path,
        [rows[0], rows[1] | {"slug": "Bad Name"}, rows[0]],
        inline="concepts:\n  - {name: bag, superclass: bag, images: [x.png]}\n",
    )
    assert any(p.startswith("products.parquet row 2, column 'slug' (name): 'Bad Name' is not a valid") for p in found)
    assert "products.parquet row 3, column 'slug' (name): duplicate name 'mug' (also products.parquet row 1)" in found
    assert "products.parquet row 3 (token): duplicate token '<mug>' (also products.parquet row 1)" in found
    assert len(found) == 4, found  # and "Bad Name"'s token '<Bad Name>', at its name's column
    found = problems_of(tmp_path, rows, inline="concepts:\n  - {name: mug, superclass: mug, images: [x.png]}\n")
    assert found == [
        "products.parquet row 1, column 'slug' (name): duplicate name 'mug' (also concepts[0])",
        "products.parquet row 1 (token): duplicate token '<mug>' (also concepts[0])",
    ]


def test_a_missing_or_mistyped_column_and_an_unreadable_table_are_refused(tmp_path):
    rows = products(tmp_path)
    found = problems_of(tmp_path, rows, columns="  columns: {name: slug, superclass: category, images: pics}\n")
    assert len(found) == 1 and found[0].startswith("concepts_from.columns.superclass: no column 'category' in")
    assert "(its columns: kind, pics, sku, slug, steps, weight)" in found[0]
    found = problems_of(tmp_path, [r | {"pics": 7} for r in rows])
    assert found == ["products.parquet column 'pics' (images): holds int64; expected a list of strings, or a string"]
    found = problems_of(tmp_path, rows, columns=COLUMNS.replace("training: {steps: steps}", "training: {stpes: steps}"))
    assert "concepts_from.columns.training.stpes: not a training field (see perfusion.TrainConfig)" in found
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(
        ManifestError, match=r"concepts_from.table: cannot read garbage.parquet \(.*\): is it a parquet"
    ):
        load_manifest(write_manifest(tmp_path, "concepts_from: {table: garbage.parquet}\n"))
    with pytest.raises(ManifestError, match=r"concepts_from\.table: nope\.parquet: file not found"):
        load_manifest(write_manifest(tmp_path, "concepts_from: {table: nope.parquet}\n"))
    with pytest.raises(ManifestError, match="concepts: none given: list them here, or give a product table"):
        load_manifest(write_manifest(tmp_path, ""))


def test_a_bad_photo_in_a_row_is_named_by_its_row_at_planning(tmp_path):
    rows = products(tmp_path)
    (tmp_path / "photos" / "bag" / "1.png").write_bytes(b"not a png")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "products.parquet")
    manifest = load_manifest(write_manifest(tmp_path, f"concepts_from:\n  table: products.parquet\n{COLUMNS}"))
    plan = {item.spec.name: item for item in build_plan(manifest, "fp")}
    assert plan["mug"].problems == ()  # a bad photo fails only its own product
    (problem,) = plan["bag"].problems
    assert str(problem).startswith("products.parquet row 2, column 'pics' (images[1]): ")


def test_the_example_table_catalog_plans_the_example_catalogs_concepts():
    table = load_manifest(REPO / "manifests" / "catalog-table.yaml")
    inline = load_manifest(REPO / "manifests" / "catalog.yaml")
    assert [item.concept_key for item in build_plan(table, "fp")] == [
        item.concept_key for item in build_plan(inline, "fp")
    ]
    assert table.concepts[0].tags == {"sku": "TOY-001", "shelf": "stars"}


def test_a_table_catalog_trains_and_its_rows_carry_the_tables_tags(tmp_path, ray_local):
    from pipeline.index import ConceptIndex
    from pipeline.store import Store

    pq.write_table(pa.Table.from_pylist(products(tmp_path)), tmp_path / "products.parquet")
    manifest = write_manifest(tmp_path, f"concepts_from:\n  table: products.parquet\n{COLUMNS}")
    result = runner.invoke(app, ["train", str(manifest)])
    assert result.exit_code == 0 and "table-shop: trained 2, skipped 0" in result.output, result.output
    rows = {r["name"]: r for r in ConceptIndex(Store(str(tmp_path / "store"))).latest()}
    assert json.loads(rows["mug"]["tags"]) == {"sku": "SKU-1", "weight": 0.5} and rows["mug"]["steps"] == 6
    assert rows["bag"]["steps"] == 4
