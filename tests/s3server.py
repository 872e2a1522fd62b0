"""A real S3-compatible server for tests: moto's server on 127.0.0.1 (a free port), in a thread of
the test process, reached over HTTP by pyarrow's S3 client exactly as a MinIO or AWS endpoint is.

Credentials are not checked unless a test asks (`enforcing_credentials`): then every request must
be signed with an access key of a user created here, and allowed by that user's policy.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REGION = "us-east-1"
ADMIN = ("softprune-admin", "softprune-admin-secret")  # any key works while credentials are not checked


class S3Server:
    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request in the test output
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()

    def client(self, service: str = "s3", key: tuple[str, str] = ADMIN):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key[0], aws_secret_access_key=key[1])

    def create_bucket(self, prefix: str = "sp") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, key: tuple[str, str] = ADMIN) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ACCESS_KEY_ID": key[0], "AWS_SECRET_ACCESS_KEY": key[1], "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def user(self, allow_s3: bool) -> tuple[str, str]:
        """A new IAM user's access key; with `allow_s3` it may do anything in S3, else nothing."""
        iam = self.client("iam")
        name = f"u-{uuid.uuid4().hex[:10]}"
        iam.create_user(UserName=name)
        if allow_s3:
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    @contextmanager
    def enforcing_credentials(self):
        """Within: every request is authenticated and authorised (moto's IAM checks)."""
        from moto import settings

        before = settings.INITIAL_NO_AUTH_ACTION_COUNT
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        try:
            yield self
        finally:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = before


@contextmanager
def aws_environment(values: dict[str, str], home: Path) -> Iterator[None]:
    """Exactly `values` as the process's AWS settings (every other AWS_* variable removed, the
    shared credentials/config files pointed at nothing under `home`), restored on exit. Ray
    workers started within inherit them."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({"AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
                       "AWS_CONFIG_FILE": str(home / "no-config"), **values})
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(saved)


class Bucket:
    """A fresh bucket on the server, and URIs in it."""

    def __init__(self, server: S3Server):
        self.server = server
        self.name = server.create_bucket()

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        return self.server.keys(self.name, prefix)
