"""Real pieces for the bad-input tests: an HTTP server on 127.0.0.1 serving a folder, a port
nobody listens on, byte snapshots of a folder, and a run directory as a earlier run left it."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import sys
import threading
from pathlib import Path

import yaml


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def serve_directory(root: Path):
    """`http://127.0.0.1:PORT` serving `root` (404 for what is not there) while the block runs."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (and every folder, as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def write_existing_run(run_dir: Path, config: dict, with_config_yaml: bool = True) -> None:
    """What a run that got to its first checkpoint leaves: config.yaml, a checkpoint directory with
    softprune's state (holding the resolved config) and a model file, and final/report.json."""
    from orchestrator.checkpoint import STATE_FILE, RunState

    ckpt = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(RunState(epoch=1, global_step=8, config=config).to_json())
    (ckpt / "model.pt").write_bytes(bytes(range(256)) * 4)
    (run_dir / "final").mkdir()
    (run_dir / "final" / "report.json").write_text('{"name": "run"}\n')
    if with_config_yaml:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def ray_state() -> bool:
    """Whether ray is imported in this process (asserted unchanged around a refused command)."""
    return "ray" in sys.modules


def assert_ray_not_started(ray_tmp: Path, ray_was_imported: bool) -> None:
    """No Ray session (its temp dir, SOFTPRUNE_RAY_TMP, is not even created) and, if this process
    had not imported ray before, it still has not."""
    assert not ray_tmp.exists(), f"a Ray session was started under {ray_tmp}"
    if not ray_was_imported:
        assert "ray" not in sys.modules, "ray was imported"
    else:
        import ray

        assert not ray.is_initialized()


def refused(argv: list[str], capsys, tmp_path: Path, ray_tmp: Path, prefix: str) -> str:
    """Run `softprune ARGV` in-process; check the one-line refusal and that nothing changed."""
    from launch.cli import main

    before, ray_was_imported = snapshot(tmp_path), ray_state()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in out + err
    assert_ray_not_started(ray_tmp, ray_was_imported)
    assert snapshot(tmp_path) == before
    return lines[0]
