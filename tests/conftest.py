"""Test-wide setup: every cache, temp dir and log stays inside the repo's ignored .cache/."""

from __future__ import annotations

import pytest

from orchestrator.env import set_defaults

set_defaults({"WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"})


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, one for the whole session (tests/s3server.py)."""
    from tests.s3server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, tmp_path):
    """A fresh bucket, with the AWS environment pointing at the test server for this test only."""
    from tests.s3server import Bucket, aws_environment

    with aws_environment(s3_server.env(), tmp_path):
        yield Bucket(s3_server)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
