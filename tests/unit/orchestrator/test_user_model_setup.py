"""The orchestrator's side of `model.name=package.module:factory` (factories in tests/user_models.py):
the class count reaches the factory, the model is traced at data.image_size, the run's own saved
copies (the self-teacher) rebuild through the factory with model.kwargs, and PFEC's mid-run
compaction ships (through the training loop without Ray, as tests/unit/orchestrator/
test_compact_at_freeze.py runs it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.unit.orchestrator.test_compact_at_freeze import Kept, _train

NAME = "tests.user_models:small_net"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    from data import write_synthetic

    return str(write_synthetic(tmp_path_factory.mktemp("shards"), classes=3, train=8, val=4, size=8, shard_size=8))


def _cfg(manifest: str, **model):
    from orchestrator.config import load_config

    return load_config({"data": {"train": manifest, "image_size": 24},
                        "model": {"name": NAME, "kwargs": {"width": 4}, **model}})


def test_the_factory_gets_the_class_count_and_the_trace_the_image_size(manifest):
    from orchestrator.model_setup import build_model

    model = build_model(_cfg(manifest), None)
    meta = model.softprune_meta
    assert (meta.name, meta.family, meta.num_classes, meta.input_size) == (NAME, "traced", 3, 24)  # the manifest's 3
    assert model.stem[0].out_channels == 4  # model.kwargs
    assert build_model(_cfg(manifest, num_classes=7), None).fc.out_features == 7
    fixed = build_model(_cfg(manifest, name="tests.user_models:fixed_head", kwargs={}), None)
    assert fixed.fc.out_features == 3  # takes no num_classes: the factory decides
    zero = build_model(_cfg(manifest, zero_init_residual=True), None)
    assert float(zero.stage1.b[1].weight.detach().abs().sum()) == 0.0  # the traced blocks' last BN


def test_the_self_teacher_of_a_user_model_rebuilds_through_the_factory(manifest, tmp_path):
    from orchestrator.distill import _load_self, save_self
    from orchestrator.model_setup import build_model

    cfg = _cfg(manifest)
    torch.manual_seed(0)
    model = build_model(cfg, None)
    run = SimpleNamespace(rank=0, cfg=cfg, model=model, checkpoint_files=tmp_path)
    save_self(run)
    teacher = _load_self(run).model
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(teacher(x), model.eval()(x))


@pytest.mark.usefixtures("world_of_one")
def test_pfec_on_a_user_model_compacts_mid_run_and_ships(manifest, tmp_path):
    """PFEC's prune compacts the user model into a GraphModule at epoch 1; the run retrains it and
    ships it with the spec recorded at the compaction (the compact copy has no meta to read)."""
    from orchestrator.config import load_config
    from pruning import load_compact

    cfg = load_config({"name": "pfec", "storage": str(tmp_path / "runs"), "epochs": 2,
                       "model": {"name": NAME, "kwargs": {"width": 4, "blocks": "full"}},
                       "data": {"train": manifest, "val": manifest, "batch_size": 4, "image_size": 8,
                                "transform": "cifar", "num_workers": 0, "shuffle_buffer": 4},
                       "pruning": {"method": "pfec", "policy": "pfec", "criterion": "l1", "rate": 0.5,
                                   "prune_epoch": 1},
                       "checkpoint": {"every_minutes": None, "on_preemption": False, "upload": "sync"},
                       "scaling": {"workers": 1}, "tracking": {"wandb": False}, "watchdog": {"timeout_s": 0}})
    run, _ = _train(cfg, Kept(tmp_path / "ckpts"))
    report = run.report
    assert report["compact_mode"] == "hard" and report["pruned"]["params"] < report["dense"]["params"]
    model, spec, _ = load_compact(tmp_path / "runs" / "pfec" / "final")
    assert spec["model_kwargs"] == {"width": 4, "blocks": "full"} and spec["policy"] == "pfec"
    assert sum(p.numel() for p in model.parameters()) == report["pruned"]["params"]
