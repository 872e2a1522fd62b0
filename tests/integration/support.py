"""What several Ray integration tests set up alike: a small local Ray, small synthetic shards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_ray(suffix: str) -> Iterator[None]:
    """A 2-CPU local Ray for one test module. Ray's Unix socket paths must stay under 107 bytes:
    a short temp dir under the repo's .cache, not the test's tmp_path."""
    import ray

    from orchestrator.driver import default_ray_temp_dir

    ray.init(address="local", num_cpus=2, _temp_dir=default_ray_temp_dir(suffix), log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def small_shards(tmp_path_factory, train: int, val: int) -> str:
    """Synthetic 4-class, 16 px shards of 16 samples each; returns the root as a string."""
    from data import write_synthetic

    root = tmp_path_factory.mktemp("shards")
    return str(write_synthetic(root, classes=4, train=train, val=val, size=16, seed=0, shard_size=16))
