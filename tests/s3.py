"""Object storage as a real component of the tests: an S3-compatible server on 127.0.0.1.

moto's ``ThreadedMotoServer`` answers the S3 HTTP API in a thread of the test process; pyarrow's, boto3's and DVC's
real clients talk to it over loopback, exactly as they would to S3 or MinIO (endpoint, signed requests, buckets,
multipart uploads). The fixtures in tests/conftest.py start one server per session and make one bucket per test.

What a client needs, in this process or in a subprocess (a stage, ``dvc``, a Ray node), is in :meth:`S3Server.env`:
the endpoint as ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL`` (pyarrow 25's ``FileSystem.from_uri`` and botocore
read them; Ray Train opens ``s3://`` storage with the former), test credentials and a region. Instance metadata is
off, so a client without credentials fails at once instead of asking 169.254.169.254.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION = "us-east-1"  # moto's default: buckets need no LocationConstraint there
ACCESS_KEY = "testing-key"  # moto accepts any key pair; these only make the requests signed
SECRET_KEY = "testing-secret"
# The variables that point an AWS client elsewhere: a test's environment starts without them.
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI")


class S3Server:
    """moto's S3 server on 127.0.0.1 (a port the OS picks), in a thread of this process. ``start()`` returns once
    it listens; ``stop()`` shuts it down and joins the thread."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> "S3Server":
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def env(self, credentials: bool = True) -> dict[str, str]:
        """The variables an AWS client needs for this server (without credentials: ``credentials=False``, and the
        shared files pointed at nothing, so that no credentials are found anywhere)."""
        env = {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION,
               "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
        if credentials:
            env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        else:
            env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
                       AWS_CONFIG_FILE="/nonexistent/aws-config")
        return env

    def subprocess_env(self, credentials: bool = True) -> dict[str, str]:
        """This process's environment with every AWS variable replaced by :meth:`env`'s: for a stage, ``dvc`` or
        ``ray start`` in a subprocess."""
        import os

        base = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
        return {**base, **self.env(credentials)}

    def client(self) -> Any:
        """A boto3 S3 client of this server (the test's own view of the buckets)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY)

    def bucket(self, prefix: str = "test") -> "Bucket":
        """A new, empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return Bucket(self, name)


@dataclass
class Bucket:
    """One bucket of an :class:`S3Server`; ``url`` is ``s3://<name>``."""

    server: S3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file under ``folder`` to ``<prefix>/<relative path>``; returns the folder's URL."""
        client = self.server.client()
        for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            client.upload_file(str(f), self.name, f"{prefix}/{f.relative_to(folder).as_posix()}")
        return f"{self.url}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """The keys under ``prefix``, sorted (all pages)."""
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.server.client().get_object(Bucket=self.name, Key=key)["Body"].read()
