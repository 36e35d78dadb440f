"""Where finished images live: files under one root (local), or an S3-compatible
bucket. Keys are relative paths; nothing escapes the root or the key prefix."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from imagegenx.settings import Settings

KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$"
MAX_KEY_CHARS = 512
_KEY_RE = re.compile(KEY_PATTERN)


class InvalidKey(ValueError):
    """A storage key that could address something outside the storage root."""


class Storage(Protocol):
    """Writes images. A storage that can hand out its own URLs (S3) also has
    ``url(key)``; local files are served by the API under /api/v1/files/."""

    def put(self, key: str, data: bytes, content_type: str) -> None: ...


def check_key(key: str) -> str:
    if len(key) > MAX_KEY_CHARS or not _KEY_RE.fullmatch(key) or ".." in key.split("/"):
        raise InvalidKey(f"invalid storage key: {key!r}")
    return key


class LocalStorage:
    """Files under one root directory, written atomically (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        check_key(key)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidKey(f"invalid storage key: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class S3Storage:
    """Objects in an S3-compatible bucket; results carry presigned GET URLs.

    Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, an instance role...).
    A presigned URL lives ``expires_s`` seconds, and never longer than the
    credentials that signed it.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "",
                 addressing_style: str = "auto", expires_s: int = 86400,
                 client: Any = None) -> None:
        if client is None:
            import boto3
            from botocore.config import Config

            # A session of its own: credentials are resolved for this storage, not
            # cached process-wide by boto3's default session.
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None, region_name=region or None,
                config=Config(signature_version="s3v4", s3={"addressing_style": addressing_style},
                              retries={"max_attempts": 3, "mode": "standard"}),
            )
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.expires_s = expires_s

    def object_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data,
                               ContentType=content_type)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def url(self, key: str) -> str:
        """A presigned GET URL of the object (signing needs no request to S3)."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.object_key(key)},
            ExpiresIn=self.expires_s,
        )


def create_storage(settings: "Settings") -> LocalStorage | S3Storage:
    """The storage the settings name (``storage_backend``)."""
    if settings.storage_backend == "s3":
        return S3Storage(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url,
                         settings.s3_region, settings.s3_addressing_style,
                         settings.s3_presign_expires_s)
    return LocalStorage(settings.storage_root)
