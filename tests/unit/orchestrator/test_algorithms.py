"""Each pruning algorithm driven through the real training loop on a tiny model, without Ray:
one process, a gloo group of one, a real DeepSpeed engine and real shards. Checks the order of
the events the loop calls, and that each algorithm's own state survives a JSON round trip (the
checkpoint) and is what the run saved."""

from __future__ import annotations

import functools
import json

import pytest

EVENTS = ("on_train_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_finish")


class Recorder:
    """Passes everything to the real algorithm, noting each event call."""

    def __init__(self, inner, calls: list[str]):
        self._inner, self._calls = inner, calls

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name not in EVENTS:
            return value

        @functools.wraps(value)
        def noted(run):
            self._calls.append(name)
            return value(run)
        return noted


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data import write_synthetic

    return str(write_synthetic(tmp_path_factory.mktemp("shards"), classes=4, train=32, val=16, size=8, seed=0,
                               shard_size=16))


def _run(method_overrides: dict, shards: str, tmp_path, monkeypatch):
    from orchestrator import trainer
    from orchestrator.config import load_config
    from orchestrator.worker import Run

    cfg = load_config({"name": "algo", "storage": str(tmp_path), "epochs": 2, "seed": 0,
                       "model": {"name": "resnet20", "num_classes": 4},
                       "data": {"train": shards, "val": shards, "batch_size": 8, "image_size": 8,
                                "transform": "cifar", "num_workers": 0, "shuffle_buffer": 8},
                       "scaling": {"workers": 1}, "tracking": {"wandb": False}, "watchdog": {"timeout_s": 0}},
                      method_overrides)
    calls: list[str] = []
    real = trainer.make_algorithm
    monkeypatch.setattr(trainer, "make_algorithm", lambda c: Recorder(real(c), calls))
    trainer.setup_worker(cfg)
    run = Run(cfg)
    try:
        trainer.train(run)
    finally:
        run.close()
    return cfg, run, calls


def _expected(epochs: int, steps: int) -> list[str]:
    return ["on_train_start", *(["on_epoch_start", *["on_step_end"] * steps, "on_epoch_end"] * epochs), "on_finish"]


@pytest.mark.parametrize("method, overrides, epochs", [
    ("none", {}, 2),
    ("sfp", {"pruning.method": "sfp", "pruning.rate": 0.3, "pruning.finetune_epochs": 1,
             "pruning.recalibrate_batches": 1, "pruning.compact_at_freeze": False}, 3),
    ("sfp_compacted", {"pruning.method": "sfp", "pruning.rate": 0.3, "pruning.finetune_epochs": 1,
                       "pruning.recalibrate_batches": 1}, 3),
    ("pfec", {"pruning.method": "pfec", "pruning.policy": "pfec", "pruning.rate": 0.5, "pruning.prune_epoch": 1}, 2),
])
def test_events_in_order_and_state_round_trips(method, overrides, epochs, world_of_one, shards, tmp_path,
                                               monkeypatch):
    from orchestrator.algorithms import make_algorithm

    cfg, run, calls = _run(overrides, shards, tmp_path, monkeypatch)
    assert calls == _expected(epochs, steps=32 // 8)
    saved = run.algorithm.state_dict()
    assert run.state.algorithm == saved  # the last checkpoint carried the algorithm's own state
    again = make_algorithm(cfg)
    again.load_state_dict(json.loads(json.dumps(saved)))
    assert again.state_dict() == saved
    if method == "sfp":
        assert saved["frozen"] and saved["masks"] is not None
        assert [e["hard"] for e in saved["history"]] == [False, False, True, True]  # 2 soft, finalize, 1 frozen
        assert again.progress()["rate"] is None  # nothing measured before the run's groups exist
        assert not saved["compacted"] and run.state.arch_spec is None
    if method == "sfp_compacted":  # the fine-tuning epoch trained the compacted model: no mask event
        assert saved["frozen"] and saved["compacted"] and run.state.arch_spec is not None
        assert [e["hard"] for e in saved["history"]] == [False, False, True]  # 2 soft, finalize
        assert again.progress() == saved["progress"] and 0 < saved["progress"]["macs_kept"] < 1
    if method == "pfec":
        assert saved["compacted"] and run.state.arch_spec is not None and len(saved["history"]) == 1
        assert 0 < again.progress()["macs_kept"] < 1
    if method == "none":
        assert saved == {}
    assert run.report is not None and run.report["mask_history"] == saved.get("history", [])


def test_step_counted_mask_events_follow_the_fractional_schedule(world_of_one, shards, tmp_path, monkeypatch,
                                                                 capsys):
    """`pruning.every_steps=3` with 4 steps per epoch: soft events at global steps 3, 6, 9, 12 at
    the ASFP rate of the fractional epoch, the last one before the freeze, then the finalize; the
    run says once that 3 steps between events is far below the papers' regime."""
    from pruning import make_schedule

    cfg, run, calls = _run({"epochs": 3, "pruning.method": "asfp", "pruning.rate": 0.4, "pruning.every_steps": 3,
                            "pruning.recalibrate_batches": 1}, shards, tmp_path, monkeypatch)
    history = run.algorithm.state_dict()["history"]
    soft = [e for e in history if not e["hard"]]
    assert [e["global_step"] for e in soft] == [3, 6, 9, 12, 12]  # + the event before the freeze
    assert [e["at"] for e in soft[:4]] == pytest.approx([0.75, 1.5, 2.25, 3.0])
    rate = make_schedule(cfg.pruning, cfg.epochs)
    assert [e["rate"] for e in soft[:4]] == pytest.approx([rate(e["at"]) for e in soft[:4]])
    assert soft[0]["rate"] < soft[1]["rate"] < soft[2]["rate"]  # the curve rises within epochs too
    assert [e["hard"] for e in history][-1] is True
    out = capsys.readouterr().out
    assert out.count("optimizer steps between mask events") == 1 and "pruning.every_steps=200" in out
    assert all(h["filter_norm"] > 0 and h["filter_eff_lr"] > 0 for h in run.state.history)


def test_a_dense_start_holds_step_counted_events_until_start_epoch(world_of_one, shards, tmp_path, monkeypatch):
    """`pruning.start_epoch=1`: epoch 0 trains dense (its step-3 event is skipped), then events at
    steps 6, 9, 12 at the rate of the curve that starts at epoch 1."""
    from pruning import make_schedule

    cfg, run, _ = _run({"epochs": 3, "pruning.method": "asfp", "pruning.rate": 0.4, "pruning.every_steps": 3,
                        "pruning.start_epoch": 1, "pruning.recalibrate_batches": 1}, shards, tmp_path, monkeypatch)
    soft = [e for e in run.algorithm.state_dict()["history"] if not e["hard"]]
    assert [e["global_step"] for e in soft] == [6, 9, 12, 12]
    rate = make_schedule(cfg.pruning, cfg.epochs)
    assert [e["rate"] for e in soft[:3]] == pytest.approx([rate(1.5), rate(2.25), rate(3.0)])
    assert rate(0.75) == 0.0 and 0 < soft[0]["rate"] < soft[1]["rate"]


def test_distillation_from_the_runs_own_weights_and_from_a_finished_run(world_of_one, shards, tmp_path,
                                                                        monkeypatch):
    """teacher=self: the weights just before the first mask event teach the frozen-mask epochs.
    teacher=<dense run's final/>: PFEC's retraining learns from the finished dense model."""
    import torch

    from models import create_model

    pretrained = tmp_path / "pretrained.pt"  # SFP masks from the first epoch: `self` needs weights to start from
    torch.manual_seed(7)
    torch.save(create_model("resnet20", 4).state_dict(), pretrained)
    soft = {"epochs": 2, "pruning.method": "sfp", "pruning.rate": 0.5, "pruning.finetune_epochs": 1,
            "pruning.recalibrate_batches": 1, "pruning.teacher": "self", "pruning.distill_alpha": 0.7,
            "model.pretrained": str(pretrained)}
    _, run, _ = _run(soft, shards, tmp_path / "self", monkeypatch)
    algo = run.algorithm._inner
    teacher = algo._teacher.model
    assert not any(q.requires_grad for q in teacher.parameters())
    first = run.state.stages  # the run went through finalize and the frozen epoch
    assert "finetuned" in first or "recalibrated" in first
    widths = [m.out_channels for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths[0] == 16  # the dense shape: the teacher is the model before any mask

    _, dense, _ = _run({}, shards, tmp_path / "dense", monkeypatch)
    final = tmp_path / "dense" / "algo" / "final"
    hard = {"pruning.method": "pfec", "pruning.policy": "pfec", "pruning.rate": 0.5, "pruning.prune_epoch": 1,
            "pruning.teacher": str(final)}
    _, pfec, _ = _run(hard, shards, tmp_path / "pfec", monkeypatch)
    got = dict(pfec.algorithm._inner._teacher.model.named_parameters())
    for name, value in dense.model.named_parameters():
        assert torch.equal(got[name].float().cpu(), value.detach().float().cpu()), name


def test_norm_control_records_its_targets_at_the_start_and_rescales_at_soft_events(world_of_one, shards,
                                                                                     tmp_path, monkeypatch):
    """`pruning.norm_control=init`: the targets are the masked convs' filter norms before any
    training, kept in the algorithm's state; every soft event rescales (its factor is in the
    history), hard events do not."""
    from pruning import groups_from_config

    cfg, run, _ = _run({"epochs": 3, "pruning.method": "sfp", "pruning.rate": 0.4, "pruning.norm_control": "init",
                        "pruning.freeze_epoch": 2, "pruning.recalibrate_batches": 1,
                        "pruning.compact_at_freeze": False, "optim.lr": 0.5}, shards, tmp_path, monkeypatch)
    saved = run.algorithm.state_dict()
    targets = saved["norm_targets"]
    assert set(targets) == set(groups_from_config(run.model, cfg.pruning).convs())
    assert all(t > 0 for t in targets.values())
    soft = [e for e in saved["history"] if not e["hard"]]
    hard = [e for e in saved["history"] if e["hard"]]
    assert len(soft) == 2 and hard
    assert all(e["norm_scale"] is not None and e["norm_scale"] != 1.0 for e in soft)
    assert all(e["norm_scale"] is None for e in hard)


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_batch_the_model_sees_has_the_configured_layout(channels_last, world_of_one, shards, tmp_path,
                                                              monkeypatch):
    """`scaling.channels_last`: the stem conv gets NHWC batches in training, evaluation, BN
    recalibration and after the compaction at the freeze (a new model and engine); without it,
    NCHW ones. The parameters keep their layout: the masks' row views of them stay valid."""
    from .stem_inputs import stem_batches

    with stem_batches() as seen:
        _, run, _ = _run({"pruning.method": "sfp", "pruning.rate": 0.3, "pruning.finetune_epochs": 1,
                          "pruning.recalibrate_batches": 1, "scaling.channels_last": channels_last},
                         shards, tmp_path, monkeypatch)
    assert run.algorithm.state_dict()["compacted"]  # the last epoch trained the compacted model
    assert {training for training, _ in seen} == {True, False}  # training and evaluation both seen
    assert {layout for _, layout in seen} == {channels_last}
    assert all(p.is_contiguous() for p in run.model.parameters())
