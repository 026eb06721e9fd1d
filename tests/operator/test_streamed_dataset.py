"""A search and a Pretrain on an image folder larger than the memory budget, on the emulated
cluster with the real operator and the real `selfaugment worker` (moto S3).

The images are an s3:// prefix (96 PNGs of 16 px: 73,728 bytes decoded, over the spec's
64 KiB budget): the search's `prepare` Job shards them into s3://selfaugment/datasets/, every
later Job streams them from there, and the search's retraining Pretrain finds them prepared.
A standalone Pretrain on another prefix prepares its own before training.
"""

from __future__ import annotations

import io
import json
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image

from selfaugment.operator import names

pytestmark = pytest.mark.cluster

SECRET = {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "secret-test"}
IMAGES = 96
DATASET = {"image_size": 16, "channels": 3, "memory_budget": "64Ki", "storage_size": 16}
SMALL = {
    "moco": {"dim": 16, "queue_size": 32},
    "optim": {"batch_size": 16},
    "runtime": {"device": "cpu", "progress": False, "checkpoint_steps": 2},
}


def client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )


def upload_images(endpoint: str, prefix: str, seed: int) -> str:
    """cat/ and dog/ PNGs (16 x 20) under `prefix` in the bucket; returns the source URI."""
    s3, rng = client(endpoint), np.random.default_rng(seed)
    for index in range(IMAGES):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((20, 16), Image.Resampling.BILINEAR).save(buffer, "PNG")
        key = f"{prefix}/{'cat' if index % 2 else 'dog'}/{index:03d}.png"
        s3.put_object(Bucket="selfaugment", Key=key, Body=buffer.getvalue())
    return f"s3://selfaugment/{prefix}"


def read_json(endpoint: str, key: str) -> Any:
    body = client(endpoint).get_object(Bucket="selfaugment", Key=key)["Body"].read()
    return json.loads(body)


def test_a_search_prepares_once_and_streams_in_every_job(
    cluster, operator_process, kubelet_real, s3_endpoint, search_manifest
):
    cluster.create_secret("store-credentials", SECRET)
    source = upload_images(s3_endpoint, "sources/streamed-search", seed=1)
    manifest = search_manifest("streamed", s3_endpoint, dataset={"uri": source, **DATASET}, **SMALL)
    manifest["spec"]["dataset"].pop("limit", None)
    cluster.apply(manifest)
    body = cluster.wait_for(
        "finished", lambda: cluster.phase("streamed", "Succeeded", "Failed"), 540
    )
    assert body["status"]["phase"] == "Succeeded", (
        body["status"],
        sorted(path.name for path in kubelet_real.logs.iterdir()),
    )
    jobs = {job["metadata"]["name"] for job in cluster.jobs()}
    assert names.job_name("streamed", "prepare") in jobs
    prepare = read_json(s3_endpoint, "runs/streamed/tasks/prepare/result.json")
    uri = prepare["prepared"]["uri"]
    assert uri.startswith("s3://selfaugment/datasets/") and prepare["prepared"]["count"] == IMAGES
    for task in ("fold-0", "search-f1-r0"):
        result = read_json(s3_endpoint, f"runs/streamed/tasks/{task}/result.json")
        assert result["data"] == {"images": IMAGES, "path": "streamed"}, task
    pretrain = cluster.wait_for(
        "Pretrain Succeeded",
        lambda: (
            (p := cluster.pretrain(names.pretrain_name("streamed")))
            and (p.get("status") or {}).get("phase") == "Succeeded"
            and p
        ),
    )
    assert 0.0 <= pretrain["status"]["rotationAccuracy"] <= 1.0
    # one prepared dataset: the retraining Pretrain found the search's
    listing = client(s3_endpoint).list_objects_v2(Bucket="selfaugment", Prefix="datasets/")
    indexes = [item["Key"] for item in listing["Contents"] if item["Key"].endswith("index.json")]
    assert indexes == [f"datasets/{uri.rsplit('/', 1)[1]}/index.json"]


def test_a_pretrain_prepares_its_dataset_before_training(
    cluster, operator_process, kubelet_real, s3_endpoint
):
    cluster.create_secret("store-credentials", SECRET)
    source = upload_images(s3_endpoint, "sources/streamed-pretrain", seed=2)
    manifest = {
        "apiVersion": names.API_VERSION,
        "kind": names.PRETRAIN_KIND,
        "metadata": {"name": "streamed-pretrain", "namespace": "default"},
        "spec": {
            "dataset": {"uri": source, **DATASET},
            "model": {"width": 8},
            **SMALL,
            "optim": {"epochs": 2, "batch_size": 16},
            "evaluation": {"tasks": ["rotation"], "probe": {"epochs": 1}},
            "storage": {
                "uri": "s3://selfaugment/runs/streamed-pretrain",
                "endpoint": s3_endpoint,
                "region": "us-east-1",
                "secret_ref": "store-credentials",
            },
        },
    }
    cluster.apply(manifest)
    body = cluster.wait_for(
        "Pretrain finished",
        lambda: (
            (p := cluster.pretrain("streamed-pretrain"))
            and (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            and p
        ),
        300,
    )
    assert body["status"]["phase"] == "Succeeded", (
        body["status"],
        [path.read_text()[-2000:] for path in kubelet_real.logs.iterdir()],
    )
    assert body["status"]["checkpoint"].startswith("s3://selfaugment/runs/streamed-pretrain/")
    runs = client(s3_endpoint).list_objects_v2(
        Bucket="selfaugment", Prefix="runs/streamed-pretrain"
    )
    [result_key] = [
        item["Key"] for item in runs["Contents"] if item["Key"].endswith("/result.json")
    ]
    result = read_json(s3_endpoint, result_key)
    assert result["num_images"] == IMAGES and result["epochs"] == 2
    assert 0.0 <= result["evaluation"]["rotation"]["accuracy"] <= 1.0
    listing = client(s3_endpoint).list_objects_v2(Bucket="selfaugment", Prefix="datasets/")
    keys = [item["Key"] for item in listing["Contents"]]
    assert any(key.startswith("datasets/streamed-pretrain-train-") for key in keys), keys
