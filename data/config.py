"""`DataConfig`: the data section of the softprune config tree."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataConfig(BaseModel):
    """Where the shards are and how batches are made from them.

    `train` / `val` are shard sources, each one of:
    - a `manifest.json` path, or a directory holding one (the split is `train` for the train
      source and `val` for the val source; append `#split` to pick another);
    - an `http(s)://` URL of a manifest (shard URLs are resolved relative to it);
    - a `pipe:` command that prints a manifest, e.g. `pipe:aws s3 cp s3://b/in1k/manifest.json -`
      or `pipe:gcloud storage cat gs://b/in1k/manifest.json`; each shard is then read by the same
      command with `manifest.json` replaced by the shard's name;
    - brace-expanded shard URLs (`/data/train-{000000..000127}.tar`, `https://h/train-{0..9}.tar`,
      `pipe:aws s3 cp s3://b/train-{000000..000127}.tar -`), several joined with `::`. Without a
      manifest the loader counts each shard's samples once at start (a full read of every
      shard), so prefer a manifest for remote data.

    Sizes are per rank: `batch_size` images per step on every rank, `num_workers` loader
    processes on every rank. `mean` / `std` are in 0..1 units and are applied by `normalize` on
    the device, not in the workers (batches leave the workers as uint8).

    Loader workers are persistent: each loader (train, val) starts its `num_workers` processes on
    its first pass and keeps them until `loader.close()`, so a rank holds 2 x num_workers of them
    once it has validated (a spawned worker holds ~150 MiB of its own, mostly torch); a pass then
    starts no process. They start by `spawn` (a fresh interpreter importing torch: ~1.6 s before
    the first batch of 2 workers on 2 idle cores, once per loader and run), because the training
    process has many threads (Ray, wandb, gloo) and a child forked from it can deadlock inside
    fork. Spawned and forkserver children import the main script again as `__mp_main__`: a
    script that builds loaders must keep its work under `if __name__ == "__main__":`.
    """

    model_config = ConfigDict(extra="forbid")

    train: str | None = Field(None, description="train shard source (see class docstring)")
    val: str | None = Field(None, description="validation shard source")
    image_size: int = Field(224, ge=8, le=1024, description="side of the square crops fed to the model")
    transform: Literal["imagenet", "cifar"] = Field(
        "imagenet", description="imagenet: random resized crop + flip / resize + centre crop; "
        "cifar: pad 4 + random crop + flip / none (images stored at image_size)")
    val_crop_fraction: float = Field(0.875, gt=0.0, le=1.0,
                                     description="val centre crop side / resized short side (224/256)")
    batch_size: int = Field(256, ge=1, description="images per step on each rank")
    num_workers: int = Field(4, ge=0, description="loader processes per rank (0: in the main process)")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker prepares ahead")
    shuffle_buffer: int = Field(2000, ge=1, description="samples in each worker's shuffle buffer (1: off)")
    seed: int = Field(0, ge=0, description="seeds shard order, shuffling and augmentation")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="fraction of a shard's samples that may be unreadable before the loader raises")
    pin_memory: bool = Field(False, description="pin batches in page-locked memory (for GPU copies)")
    mp_context: Literal["spawn", "forkserver", "fork"] = Field(
        "spawn", description="how loader workers start. spawn (default): fresh interpreters, direct "
        "children, so they exit when the training process dies. forkserver: the server's children, "
        "so they outlive a training process killed by SIGKILL (measured). fork: UNSAFE in a threaded "
        "process (Ray, wandb, gloo): a child can deadlock inside fork; only for single-threaded "
        "scripts. null is read as spawn (configs written before spawn became the default)")
    check_sources: bool = Field(True, description="check at start that every shard exists / answers")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError(f"std must be positive, got {value}")
        return value

    @field_validator("mp_context", mode="before")
    @classmethod
    def _null_is_spawn(cls, value):
        # null used to mean the platform default, fork on Linux: never fork unless asked by name.
        return "spawn" if value is None else value

    @field_validator("train", "val")
    @classmethod
    def _non_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("a shard source must not be empty (use null to leave it unset)")
        return value
