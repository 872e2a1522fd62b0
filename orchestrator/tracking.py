"""Experiment tracking: wandb on rank 0, a do-nothing logger on every other rank.

Call sites never test the rank: they call `logger.log(...)` and the no-op swallows it. wandb
runs offline unless the user is logged in (or asks for online), and `WANDB_MODE` in the
environment always wins. The run id lives in the checkpoint so a resumed run continues the
same wandb run (`resume="allow"`).

A run's wandb files belong to the run: `tracking_dir(cfg)` is the directory handed to wandb
(files under `<it>/wandb/`), by default the run's own `<storage>/<name>`. For a URI (object
storage, or a URI `tracking.dir`) it is a local staging directory, and `sync_tracking` copies
its wandb files to `<storage>/<name>/wandb` (rank 0 calls it after every checkpoint and after
the logger's finish).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .config import TrackingConfig, TrainConfig


STEP_METRIC = "trainer/global_step"


class NullLogger:
    """What non-zero ranks (and runs with tracking off) get."""

    run_id: str | None = None
    run_dir: str | None = None
    step_fn = staticmethod(lambda: None)  # the run's global step; set by the owner

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def kept_channels_chart(self, dense: dict[str, int], kept: dict[str, int], png=None) -> None:
        pass

    def finish(self) -> None:
        pass


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        # reads WANDB_API_KEY, settings files and .netrc; no prompt, no call to the server
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # unreadable settings: treat as not logged in
        return False


def resolve_mode(cfg: TrackingConfig) -> str:
    """online / offline / disabled, with WANDB_MODE taking precedence over the config."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if not cfg.wandb or cfg.mode == "disabled":
        return "disabled"
    if cfg.mode == "auto":
        return "online" if _logged_in() else "offline"
    return cfg.mode


class WandbLogger(NullLogger):
    """Rank 0's logger: one wandb run per training run, resumed under its stored id."""

    def __init__(self, cfg: TrackingConfig, name: str, config: dict, run_id: str | None, directory: str | None):
        import wandb

        os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")  # no system monitor writing to ~/.cache
        self._wandb = wandb
        kwargs = dict(project=cfg.project, entity=cfg.entity, name=name, resume="allow", config=config,
                      tags=cfg.tags, mode=resolve_mode(cfg), dir=directory, reinit="finish_previous")
        self.run = _init_with_retry(wandb, run_id, kwargs)
        self.run_id = self.run.id
        self.run_dir = getattr(self.run, "dir", None)
        # Our own step axes: wandb drops a point whose `step=` is not above the last one it saw,
        # so a run resumed from an older checkpoint would lose its replayed history.
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("train/*", step_metric=STEP_METRIC)
        self.run.define_metric("epoch")
        for prefix in ("val/*", "prune/*", "epoch/*", "stage/*"):
            self.run.define_metric(prefix, step_metric="epoch")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log with the optimizer step as a field; wandb's own step just counts calls."""
        self.run.log({**metrics, STEP_METRIC: step if step is not None else self.step_fn()})

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def kept_channels_chart(self, dense: dict[str, int], kept: dict[str, int], png=None) -> None:
        """Per-layer kept channels: a wandb table + bar chart, and a matplotlib PNG for offline runs
        (`png`, when the run already drew one, else drawn here)."""
        rows = [[layer, dense[layer], kept.get(layer, dense[layer])] for layer in dense]
        table = self._wandb.Table(data=rows, columns=["layer", "dense", "kept"])
        self.run.log({"final/kept_channels": self._wandb.plot.bar(table, "layer", "kept", title="kept channels per layer")})
        self.run.log({"final/kept_channels_table": table})
        if png is None and self.run_dir:
            from .plots import kept_channels_png

            png = kept_channels_png(rows, self.run_dir)
        if png is not None:
            self.run.log({"final/kept_channels_png": self._wandb.Image(str(png))})

    def finish(self) -> None:
        """End the wandb run; return once its files are complete, so a copy made next (the upload
        to object storage, `sync_tracking`) is whole: wandb's service process still writes the run
        file for a moment after `finish()` returns."""
        self.run.finish()
        if self.run_dir:
            _wait_until_settled(Path(self.run_dir).parent)


def _wait_until_settled(directory: Path, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
    """Poll the files under `directory` until none changed (size, mtime) for `quiet_s`, at most `limit_s`."""
    import time

    def stamp() -> list[tuple[str, int, int]]:
        out = []
        for file in directory.rglob("*"):
            try:
                st = file.stat()
            except OSError:  # removed while listing
                continue
            out.append((str(file), st.st_size, st.st_mtime_ns))
        return sorted(out)

    deadline, last, quiet_since = time.monotonic() + limit_s, None, time.monotonic()
    while time.monotonic() < deadline:
        now = stamp()
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.1)


def _init_with_retry(wandb, run_id: str | None, kwargs: dict, attempts: int = 15, wait_s: float = 2.0):
    """`wandb.init` under the stored id (None: wandb makes one; it goes into the checkpoint).

    After a worker-group restart the killed group's wandb service can hold the id for a few
    seconds ("run ID ... is in use"), so the init is retried; if the id stays taken, a new run is
    started rather than failing the training (tracking must never stop a run).
    """
    import time

    for attempt in range(attempts):
        try:
            return wandb.init(id=run_id, **kwargs)
        except Exception as exc:  # wandb raises several private error types for this
            if run_id is None or attempt == attempts - 1:
                last = exc
                break
            time.sleep(wait_s)
    print(f"[softprune] wandb run {run_id} unavailable ({last}); logging to a new run", flush=True)
    return wandb.init(id=None, **kwargs)


def make_logger(cfg: TrackingConfig, rank: int, name: str, config: dict, run_id: str | None,
                directory: str | None = None) -> NullLogger:
    """wandb on rank 0 when tracking is on, the no-op logger everywhere else. A run passes
    `directory=tracking_dir(cfg)`, so its wandb files stay with the run (see the module docstring)."""
    if rank != 0 or resolve_mode(cfg) == "disabled":
        return NullLogger()
    return WandbLogger(cfg, name, config, run_id, directory)


# -- where the files go -------------------------------------------------------------------------
def tracking_target(cfg: TrainConfig) -> str:
    """Where the run's wandb files must end up (they are under `<target>/wandb`)."""
    from .storage import join

    return cfg.tracking.dir or join(cfg.storage_abspath, cfg.name)


def tracking_dir(cfg: TrainConfig) -> str:
    """The local directory to give wandb (`make_logger(..., directory=tracking_dir(cfg))`):
    the target itself when it is local, else a staging directory under .cache that
    `sync_tracking` uploads. The same run gets the same staging directory after a restart."""
    from . import env
    from .storage import is_uri

    target = tracking_target(cfg)
    if is_uri(target):
        digest = hashlib.sha256(target.encode()).hexdigest()[:12]
        local = env.CACHE / "wandb_staging" / f"{cfg.name}-{digest}"
    else:
        local = Path(target)
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


_synced: dict[str, tuple[int, int]] = {}  # file -> (size, mtime) at its last upload


def sync_tracking(cfg: TrainConfig, local_dir: str | None) -> None:
    """Upload `local_dir/wandb` to `<target>/wandb` when the target is a URI (new or changed
    files only); a no-op for a local target. Tracking never stops a run: a failed upload is
    reported in one line and the next sync tries again."""
    from .storage import is_uri, join, upload_dir

    target = tracking_target(cfg)
    source = Path(local_dir or "") / "wandb"
    if not local_dir or not is_uri(target) or not source.is_dir():
        return

    stamps: dict[str, tuple[int, int]] = {}

    def unchanged(file: Path) -> bool:  # stamped before the upload: a write during it is sent next time
        st = file.stat()
        stamps[str(file)] = (st.st_size, st.st_mtime_ns)
        return _synced.get(str(file)) == stamps[str(file)]

    try:
        upload_dir(source, join(target, "wandb"), skip=unchanged)
    except Exception as exc:  # storage trouble must not end the training
        print(f"[softprune] wandb files not uploaded to {join(target, 'wandb')}: {exc}", flush=True)
        return
    _synced.update(stamps)


def stored_run_dir(cfg: TrainConfig, local_run_dir: str | None) -> str | None:
    """Where a wandb run directory (`<tracking_dir>/wandb/<run>`) lives once synced."""
    from .storage import is_uri, join

    if not local_run_dir:
        return None
    target, run = tracking_target(cfg), Path(local_run_dir)
    if not is_uri(target) or run.parent != Path(tracking_dir(cfg)) / "wandb":
        return local_run_dir  # not one sync_tracking uploads
    return join(target, "wandb", run.name)
