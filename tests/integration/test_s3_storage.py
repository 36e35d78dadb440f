"""S3-compatible storage through a real worker, against a local S3 server (moto in server mode)."""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image

from tests.integration.stack import API_KEY, Stack, running_stack
from tests.service import free_port, wait_task

pytestmark = pytest.mark.integration

BUCKET = "imagegenx-test"
PREFIX = "images/"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Iterator[object]:
    import boto3

    with pytest.MonkeyPatch.context() as mp:  # the API in this process signs with these
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture(scope="module")
def stack(redis_base: str, tiny_model: Path, s3: object, s3_endpoint: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_base, tmp_path_factory.mktemp("s3"), tiny_model, name="s3",
                       IMAGEGENX_STORAGE_BACKEND="s3", IMAGEGENX_S3_BUCKET=BUCKET,
                       IMAGEGENX_S3_PREFIX=PREFIX, IMAGEGENX_S3_ENDPOINT_URL=s3_endpoint,
                       IMAGEGENX_S3_REGION="us-east-1", IMAGEGENX_S3_PRESIGN_EXPIRES_S="600",
                       **AWS_ENV) as s:
        yield s


def png(content: bytes) -> Image.Image:
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(content))
    image.load()
    return image


def test_images_go_to_the_bucket_and_presigned_urls_download_them(stack: Stack, s3: object,
                                                                   s3_endpoint: str) -> None:
    body = {"prompt": "stored in s3", "seed": 11, "num_images": 2, "width": 64, "height": 96,
            "postprocess": {"thumbnail": 32}}
    r = requests.post(f"{stack.base}/api/v1/images", json=body, headers=stack.headers, timeout=10)
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    result = wait_task(stack.base, task_id, API_KEY, 60)
    assert result["state"] == "SUCCESS", result
    images = result["result"]["images"]
    assert len(images) == 2

    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}{task_id}/")  # type: ignore[attr-defined]
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert keys == sorted(f"{PREFIX}{task_id}/{name}"
                          for name in ("0.png", "0.thumb.png", "1.png", "1.thumb.png"))
    head = s3.head_object(Bucket=BUCKET, Key=keys[0])  # type: ignore[attr-defined]
    assert head["ContentType"] == "image/png"

    for i, image in enumerate(images):
        for url, longest in ((image["url"], 96), (image["thumbnail_url"], 32)):
            parts = urlsplit(url)
            assert url.startswith(s3_endpoint), url
            assert parts.path.endswith(f"{task_id}/{i}.png" if url == image["url"]
                                       else f"{task_id}/{i}.thumb.png")
            query = parse_qs(parts.query)
            assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
            assert query["X-Amz-Expires"] == ["600"]
            got = requests.get(url, timeout=10)  # no credentials: the signature is the key
            assert got.status_code == 200, got.text
            assert max(png(got.content).size) == longest
    # The bucket is private: without the signature the object is refused.
    assert requests.get(images[0]["url"].split("?", 1)[0], timeout=10).status_code == 403
    # Nothing was written to local storage.
    assert not (stack.log_dir / "images").exists() or not any((stack.log_dir / "images").rglob("*.png"))


def test_files_endpoint_redirects_to_a_fresh_presigned_url(stack: Stack) -> None:
    r = requests.post(f"{stack.base}/api/v1/images", json={"prompt": "redirect", "seed": 3},
                      headers=stack.headers, timeout=10)
    task_id = r.json()["task_id"]
    assert wait_task(stack.base, task_id, API_KEY, 60)["state"] == "SUCCESS"
    url = f"{stack.base}/api/v1/files/{task_id}/0.png"
    first = requests.get(url, allow_redirects=False, timeout=10)
    assert first.status_code == 302
    assert "X-Amz-Signature=" in first.headers["Location"]
    assert png(requests.get(url, timeout=10).content).size == (64, 64)  # followed
    missing = requests.get(f"{stack.base}/api/v1/files/{task_id}/7.png", allow_redirects=False,
                           timeout=10)
    assert missing.status_code == 404
    assert requests.get(f"{stack.base}/api/v1/files/..%2Fetc/passwd", allow_redirects=False,
                        timeout=10).status_code == 404
