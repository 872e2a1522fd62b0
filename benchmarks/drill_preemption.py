"""Preemption drills on a real multi-node Ray cluster (`ray.cluster_utils.Cluster` on this machine).

Every drill starts the run the way a user does: the launcher (`softprune train`) as its own
process, attached to the cluster through RAY_ADDRESS. Faults come from the outside (a node
drained and removed, the driver killed) or from SOFTPRUNE_FAULTS inside the workers (a SIGKILL
halfway through writing a checkpoint). A `trace` fault on rank 0 records every optimizer step with
its time, which gives the steps lost (last step before the fault - step resumed from) and the
seconds to recover (fault -> first step after the resume).

Drills:
- reclaim: a worker node gets a preemption notice (a drain with a deadline, as a cloud sends it)
  mid-epoch; the run writes a just-in-time checkpoint; the node is removed and a fresh one added;
  the run resumes and must end with the same masks as an undisturbed reference run.
- driver: the launcher is SIGKILLed mid-epoch; the same command run again resumes the same run
  (same wandb id, resumed from the last checkpoint).
- torn-checkpoint: rank 0 is SIGKILLed halfway through writing a checkpoint; the run resumes from
  the previous one, and the torn one is never registered.
- shrink: an elastic run (workers [1, 2]) loses a node mid-epoch and no node comes back; it goes
  on with 1 worker (accumulating 2 micro-batches per step) and records the world-size change.

    python benchmarks/drill_preemption.py [--drills reclaim,driver,torn-checkpoint,shrink]

Prints a table (drill, outcome, steps lost, seconds to recover); exits 1 if a drill failed.
Everything goes under the checkout's .cache/drill_preemption. tests/integration/
test_preemption_drills.py runs the same drills.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS_PER_EPOCH = 8  # 128 train images, batch 8 per rank, 2 ranks
HOLD = STEPS_PER_EPOCH + 3  # a step in the middle of epoch 1


@dataclass
class Outcome:
    drill: str
    ok: bool
    detail: str
    steps_lost: int | None = None
    recover_s: float | None = None
    report: dict = field(default_factory=dict)


class DrillCluster:
    """A head node without CPUs (the driver and Ray Train's controller) and 1-CPU worker nodes."""

    def __init__(self, temp_dir: str, workers: int = 2):
        from ray.cluster_utils import Cluster

        import tempfile

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # the nodes' processes (Ray Train's controller, its preemption watcher) inherit these: a
        # notice seen within 0.5 s, and a shrunk group tried after 20 s instead of 60
        os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
        Path(tempfile.gettempdir(), "ray").mkdir(parents=True, exist_ok=True)  # Ray writes its address file there
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir})
        self.nodes = [self.cluster.add_node(num_cpus=1) for _ in range(workers)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def train_logs(self) -> Path:
        """Ray Train's structured logs of this cluster's session (its workers' own lines)."""
        return Path(self.cluster.head_node.get_session_dir_path(), "logs", "train")

    def reclaim(self, node, notice_s: float = 0.0) -> None:
        """A cloud's reclaim: a preemption drain with a deadline, then the node is gone."""
        if notice_s:
            drain(self.address, node.node_id, notice_s)
            time.sleep(notice_s)
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def add(self):
        node = self.cluster.add_node(num_cpus=1)
        self.nodes.append(node)
        return node

    def shutdown(self) -> None:
        self.cluster.shutdown()


def drain(address: str, node_id: str, deadline_s: float) -> None:
    """Ask the GCS to drain `node_id` for preemption: Ray Train sees a preemption notice."""
    import ray
    from ray.core.generated import autoscaler_pb2

    client = ray._raylet.GcsClient(address=address)
    deadline_ms = int(time.time() * 1000 + deadline_s * 1000)
    accepted, why = client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                      "drill: spot reclaim", deadline_ms)
    if not accepted:
        raise RuntimeError(f"drain of {node_id} refused: {why}")


class Drill:
    """One run directory, its config, and the launcher process."""

    def __init__(self, work: Path, name: str, shards: str, address: str, workers="2", extra=()):
        self.work, self.name, self.address = work, name, address
        self.trace = work / f"{name}.trace"
        self.held = work / f"{name}.held"  # created when rank 0 enters the mid-epoch stall
        self.go = work / f"{name}.go"  # created by the drill to end a released stall
        self.storage = work / "runs"
        self.overrides = [
            f"name={name}", f"storage={self.storage}", "epochs=3", "seed=1",
            "model.name=resnet20", "model.num_classes=4",
            f"data.train={shards}", f"data.val={shards}", "data.batch_size=8", "data.image_size=16",
            "data.transform=cifar", "data.num_workers=0", "data.shuffle_buffer=32",
            "optim.lr=0.05", "lr.schedule=cosine", "pruning.method=sfp", "pruning.rate=0.4",
            f"scaling.workers={workers}", "scaling.cpus_per_worker=1", "scaling.max_failures=3",
            "checkpoint.every_minutes=null", "checkpoint.poll_s=0.001", "checkpoint.upload=sync",
            "tracking.mode=offline", "watchdog.timeout_s=300", *extra,
        ]

    def hold(self, seconds: float = 12, released: bool = False) -> str:
        """A stall on rank 0 at step HOLD (mid epoch 1), once per drill: time for the fault.
        `released`: the stall lasts until `release()` (at most 10 minutes), so a slow machine
        cannot run out of it before the drill has set up its fault."""
        until = f":seconds=600:release={self.go}" if released else f":seconds={seconds}"
        return f"stall:rank=0:at=train:step={HOLD}{until}:once={self.held}"

    def release(self) -> None:
        self.go.touch()

    def launch(self, faults: str = "") -> subprocess.Popen:
        env = dict(os.environ, RAY_ADDRESS=self.address, SOFTPRUNE_FAULTS=";".join(
            filter(None, [f"trace:rank=0:at=train:path={self.trace}", faults])))
        log = open(self.work / f"{self.name}.log", "a")
        base = self.work / "base.yaml"
        base.write_text("{}\n")  # everything is in the overrides
        return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(base), *self.overrides], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def steps(self) -> list[tuple[float, int, int]]:
        """(time, global step, pid of rank 0) of every optimizer step, restarts included."""
        if not self.trace.exists():
            return []
        rows = (line.split() for line in self.trace.read_text().splitlines() if line)
        return [(float(t), int(s), int(pid)) for t, s, pid in rows]

    def hold_mid_epoch(self, proc: subprocess.Popen, timeout: float = 400) -> None:
        """Wait until rank 0 sits in the stall fault of `HOLD` and Ray has registered the
        epoch-0 checkpoint (a result still queued in a worker dies with it)."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.held.exists() and self.registered() >= 1:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the run ended (rc {proc.returncode}) before mid-epoch")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: mid-epoch hold not reached in {timeout} s")

    def wait_for_text(self, logs: Path, text: str, timeout: float = 60) -> None:
        """Until one of the files in `logs` holds `text`."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if any(text in f.read_text(errors="replace") for f in logs.glob("*.log")):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {text!r} not in {logs} after {timeout} s")

    def registered(self) -> int:
        snapshot = self.storage / self.name / "checkpoint_manager_snapshot.json"
        try:
            return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
        except (OSError, ValueError):
            return 0

    def report(self) -> dict:
        return json.loads((self.storage / self.name / "final" / "report.json").read_text())

    def checkpoint_states(self) -> list[dict]:
        out = []
        for d in (self.storage / self.name).glob("checkpoint_*"):
            if (d / "softprune_state.json").is_file():
                out.append(json.loads((d / "softprune_state.json").read_text()))
        return out

    def lost_and_recovery(self, fault_time: float) -> tuple[int, float]:
        """Steps done before the fault that the restarted rank 0 (another process) had to do
        again, and the seconds from the fault to the restarted run's first step."""
        trace = self.steps()
        old = [(t, s, pid) for t, s, pid in trace if t <= fault_time]
        if not old:
            return 0, float("nan")
        dead = old[-1][2]
        before = [s for _, s, pid in trace if pid == dead]
        after = [(t, s) for t, s, pid in trace if pid != dead and t > fault_time]
        if not after:
            return 0, float("nan")
        return max(0, max(before) - (after[0][1] - 1)), after[0][0] - fault_time


def final_masks(report: dict) -> dict:
    return {layer: v["kept"] for layer, v in report.get("per_layer", {}).items()}


def finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return -9


def reclaim(cluster: DrillCluster, work: Path, shards: str, reference: dict) -> Outcome:
    d = Drill(work, "reclaim", shards, cluster.address)
    proc = d.launch(d.hold(released=True))
    d.hold_mid_epoch(proc)
    before = d.registered()
    victim = cluster.nodes[0]
    drain(cluster.address, victim.node_id, 60)  # the notice; rank 0 still sits in the stall
    # Ray Train's watcher sees the drain and tells each worker; rank 0's answer is the one every
    # rank reads, so once rank 0 holds the notice the stall can end: the next step checkpoints.
    d.wait_for_text(cluster.train_logs(), "Rank 0 received preemption signal")
    d.release()
    # A cloud takes the node at the notice's deadline. The drill takes it as soon as Ray has
    # registered the just-in-time checkpoint: files in storage are not enough, since a result
    # still queued in the worker dies with the node and the restart uses the last registered one.
    until = time.monotonic() + 60
    while d.registered() <= before and time.monotonic() < until:
        time.sleep(0.05)
    fault = time.time()
    cluster.reclaim(victim)  # as soon as the just-in-time checkpoint is there
    cluster.add()  # the autoscaler's replacement
    rc = finish(proc)
    lost, recover = d.lost_and_recovery(fault)
    report = d.report() if rc == 0 else {}
    first = (report.get("resumed_from") or [{}])[0]
    jit = first.get("step", 0) > 0  # resumed mid-epoch: from the checkpoint the notice caused
    same = bool(report) and final_masks(report) == final_masks(reference)
    return Outcome("reclaim", rc == 0 and jit and same,
                   f"rc {rc}, resumed from the just-in-time checkpoint (epoch {first.get('epoch')} step "
                   f"{first.get('step')}): {jit}, masks as the reference: {same}", lost, recover, report)


def driver(cluster: DrillCluster, work: Path, shards: str) -> Outcome:
    d = Drill(work, "driver", shards, cluster.address)
    proc = d.launch(d.hold())
    d.hold_mid_epoch(proc)
    first_ids = {s["wandb_run_id"] for s in d.checkpoint_states()}
    fault = time.time()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    rc = finish(d.launch())
    lost, recover = d.lost_and_recovery(fault)
    report = d.report() if rc == 0 else {}
    same_id = report.get("wandb_run_id") in first_ids and len(first_ids) == 1
    resumed = bool(report.get("resumed_from"))
    return Outcome("driver", rc == 0 and same_id and resumed,
                   f"rc {rc}, same wandb id: {same_id}, resumed: {resumed}", lost, recover, report)


def torn_checkpoint(cluster: DrillCluster, work: Path, shards: str) -> Outcome:
    d = Drill(work, "torn", shards, cluster.address)
    marker = work / "torn.fired"
    kill_at = 2 * STEPS_PER_EPOCH  # the end-of-epoch-1 checkpoint
    # The stall mid epoch 1 gives Ray time to register the epoch-0 checkpoint: a report still
    # queued in the killed worker would die with it, and the restart would start from scratch.
    proc = d.launch(f"{d.hold()};kill:rank=0:at=checkpoint:step={kill_at}:once={marker}")
    rc = finish(proc)
    fired = marker.exists()
    fault = marker.stat().st_mtime if fired else time.time()
    lost, recover = d.lost_and_recovery(fault)
    report = d.report() if rc == 0 else {}
    first = (report.get("resumed_from") or [{}])[0]
    from_previous = first.get("epoch") == 1 and first.get("step") == 0  # the epoch-0 checkpoint
    return Outcome("torn-checkpoint", rc == 0 and fired and from_previous,
                   f"rc {rc}, killed while writing step {kill_at}: {fired}, resumed from the previous "
                   f"checkpoint (epoch {first.get('epoch')}): {from_previous}", lost, recover, report)


def shrink(cluster: DrillCluster, work: Path, shards: str) -> Outcome:
    d = Drill(work, "shrink", shards, cluster.address, workers="[1,2]")
    proc = d.launch(d.hold())
    d.hold_mid_epoch(proc)
    fault = time.time()
    cluster.reclaim(cluster.nodes[0])
    rc = finish(proc)
    lost, recover = d.lost_and_recovery(fault)
    report = d.report() if rc == 0 else {}
    changes = report.get("world_changes", [])
    shrunk = any(c["from"] == 2 and c["to"] == 1 and c["grad_accum"] == 2 for c in changes)
    return Outcome("shrink", rc == 0 and shrunk, f"rc {rc}, world changes {[(c['from'], c['to']) for c in changes]}",
                   lost, recover, report)


def reference_run(cluster: DrillCluster, work: Path, shards: str) -> dict:
    d = Drill(work, "reference", shards, cluster.address)
    rc = finish(d.launch())
    if rc != 0:
        raise RuntimeError(f"the reference run failed (rc {rc}); see {work / 'reference.log'}")
    return d.report()


def make_shards(work: Path) -> str:
    from data import write_synthetic

    return str(write_synthetic(work / "shards", classes=4, train=128, val=32, size=16, seed=0, shard_size=16))


def table(outcomes: list[Outcome]) -> str:
    rows = [f"{'drill':16} {'outcome':8} {'steps lost':>10} {'recover s':>10}  detail"]
    for o in outcomes:
        lost = "-" if o.steps_lost is None else str(o.steps_lost)
        rec = "-" if o.recover_s is None else f"{o.recover_s:.1f}"
        rows.append(f"{o.drill:16} {'ok' if o.ok else 'FAILED':8} {lost:>10} {rec:>10}  {o.detail}")
    return "\n".join(rows)


DRILLS = ("reclaim", "driver", "torn-checkpoint", "shrink")


def run_drills(work: Path, names=DRILLS) -> list[Outcome]:
    """Each drill on its own fresh cluster (a removed node must not affect the next drill)."""
    from orchestrator.driver import default_ray_temp_dir
    from orchestrator.env import set_defaults

    set_defaults({"WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"})
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work)
    outcomes = []
    for name in names:
        cluster = DrillCluster(default_ray_temp_dir("_d"))
        try:
            if name == "reclaim":
                outcomes.append(reclaim(cluster, work, shards, reference_run(cluster, work, shards)))
            elif name == "driver":
                outcomes.append(driver(cluster, work, shards))
            elif name == "torn-checkpoint":
                outcomes.append(torn_checkpoint(cluster, work, shards))
            else:
                outcomes.append(shrink(cluster, work, shards))
        finally:
            cluster.shutdown()
    return outcomes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drills", default=",".join(DRILLS), help=f"comma-separated subset of {', '.join(DRILLS)}")
    args = p.parse_args(argv)
    names = [n for n in args.drills.split(",") if n]
    unknown = sorted(set(names) - set(DRILLS))
    if unknown:
        print(f"error: --drills: unknown {', '.join(unknown)}", file=sys.stderr)
        return 3
    work = ROOT / ".cache" / "drill_preemption"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    outcomes = run_drills(work, names)
    print(table(outcomes))
    print(f"{len(outcomes)} drills in {time.monotonic() - started:.0f} s; logs under {work}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
