"""Ray Train + DeepSpeed orchestration: config tree, driver, worker loop, pruning coordinator,
checkpoints, tracking. Import the submodules you need; nothing heavy is imported here."""

__all__ = ["config", "driver", "trainer", "coordinator", "algorithms", "checkpoint", "tracking"]
