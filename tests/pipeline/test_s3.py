"""The same training flow against s3:// on a real S3-compatible HTTP server (moto) on loopback."""

from __future__ import annotations

import json

import boto3
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.index import ConceptIndex
from pipeline.store import Store
from tests.pipeline.conftest import write_catalog

runner = CliRunner()


def test_train_to_s3_then_rerun_and_fix(tmp_path, s3_endpoint, ray_local):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="catalogs")
    root = "s3://catalogs/shop"
    manifest = write_catalog(tmp_path / "shop", "./unused-local-root", names=("mug", "bag"))
    broken = tmp_path / "shop" / "photos" / "bag" / "0.png"
    good = broken.read_bytes()
    broken.write_bytes(b"not a png")

    first = runner.invoke(app, ["train", str(manifest), "--root", root])
    assert first.exit_code == 1, first.output
    assert "trained 1, skipped 0 (already trained), failed 1" in first.output
    index = ConceptIndex(Store(root))
    rows = {r["name"]: r for r in index.latest(status=None)}
    assert rows["mug"]["status"] == "succeeded" and rows["mug"]["file_uri"].startswith("concepts/")
    assert rows["bag"]["status"] == "failed"
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="catalogs", Prefix="shop/")
    keys = [o["Key"] for o in objects["Contents"]]
    assert any(k.startswith("shop/concepts/") for k in keys)
    assert any(k.startswith("shop/covariance/") for k in keys)
    assert any(k.startswith("shop/index/concepts/_delta_log/") for k in keys)
    assert not (tmp_path / "shop" / "unused-local-root").exists()  # --root won over the manifest's root

    assert "trained 0, skipped 1" in runner.invoke(app, ["train", str(manifest), "--root", root]).output
    broken.write_bytes(good)
    fixed = runner.invoke(app, ["train", str(manifest), "--root", root])
    assert fixed.exit_code == 0 and "trained 1, skipped 1" in fixed.output
    shown = runner.invoke(app, ["concepts", "show", "bag", "--root", root])
    assert shown.exit_code == 0, shown.output
    row = json.loads(shown.output)[0]
    assert row["status"] == "succeeded"
    assert "testing-secret" not in shown.output  # no credentials in rows


def test_render_to_s3_then_rerun(tmp_path, s3_endpoint, ray_local):
    from pipeline.index import RenderIndex

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="renders")
    root = "s3://renders/shop"
    manifest = write_catalog(tmp_path / "shop", "./unused-local-root", names=("mug", "bag"))
    manifest.write_text(
        manifest.read_text()
        + "renders:\n  - name: shots\n    prompts: ['a photo of {a}', '{a} next to {b}']\n    steps: 2\n"
    )
    assert runner.invoke(app, ["train", str(manifest), "--root", root]).exit_code == 0
    first = runner.invoke(app, ["render", str(manifest), "--root", root])
    assert first.exit_code == 0, first.output
    assert "rendered 3, skipped 0 (already rendered), failed 0" in first.output
    rows = RenderIndex(Store(root)).of_job("shots")
    assert len(rows) == 3 and all(r["image_uri"].startswith("renders/") for r in rows)
    store = Store(root)
    for row in rows:
        assert store.read(store.locate(row["image_uri"]), row["sha256"])[:8] == b"\x89PNG\r\n\x1a\n"
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="renders", Prefix="shop/renders/")
    keys = {o["Key"] for o in objects["Contents"]}
    assert {"shop/renders/sheets/shots.png", "shop/renders/sheets/shots.html"} <= keys
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    types = {key: client.head_object(Bucket="renders", Key=key)["ContentType"] for key in keys}
    assert types["shop/renders/sheets/shots.html"].startswith("text/html")  # a browser shows it
    assert {types[key] for key in keys if key.endswith(".png")} == {"image/png"}
    again = runner.invoke(app, ["render", str(manifest), "--root", root])
    assert again.exit_code == 0 and "rendered 0, skipped 3" in again.output
    assert "testing-secret" not in first.output + again.output
