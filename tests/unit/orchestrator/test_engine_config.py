"""DeepSpeed config derivation, optimiser construction and the LR schedule."""

from __future__ import annotations

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.deepspeed_config import deepspeed_config
from orchestrator.engine import build_optimizer, lr_at

BASE = {"data": {"train": "/data/manifest.json", "batch_size": 8}}


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "bf16"), (2, "fp32")])
def test_deepspeed_config_is_derived(stage, precision):
    cfg = load_config(BASE, [f"scaling.zero_stage={stage}", f"scaling.precision={precision}",
                             "scaling.workers=4", "scaling.grad_accum=2", "optim.grad_clip=1.5"])
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 8 * 4 * 2 == ds["train_micro_batch_size_per_gpu"] * 4 * ds["gradient_accumulation_steps"]
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16") and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 1.5
    assert "optimizer" not in ds and "scheduler" not in ds  # torch optimiser, LR set per step
    assert ds.get("data_types", {}).get("buffer_dtype") == (None if precision == "fp32" else precision)


def test_optimizers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sgd = build_optimizer(model, load_config(BASE).optim)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and len(sgd.param_groups) == 1
    adamw = build_optimizer(model, load_config(BASE, ["optim.name=adamw", "optim.decay_norm_and_bias=false"]).optim)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-4, 0.0]
    assert len(adamw.param_groups[1]["params"]) == 3  # BN weight, BN bias, conv bias


def test_multistep_paper_schedule():
    cfg = load_config("launch.recipes:resnet101_asfp", ["data.train=/x"])
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(29.99, cfg) == pytest.approx(0.1)
    assert lr_at(30, cfg) == pytest.approx(0.01)
    assert lr_at(60.5, cfg) == pytest.approx(0.001)
    assert lr_at(95, cfg) == pytest.approx(0.0001)


def test_warmup_cosine_and_finetune_lr():
    cfg = load_config(BASE, ["epochs=10", "lr.schedule=cosine", "lr.warmup_epochs=2", "optim.lr=1.0",
                             "pruning.method=sfp", "pruning.finetune_epochs=2"])
    assert lr_at(1.0, cfg) == pytest.approx(0.5, rel=1e-6)
    assert lr_at(2.0, cfg) == pytest.approx(1.0)
    assert lr_at(6.0, cfg) == pytest.approx(0.5)
    assert lr_at(10.5, cfg) == lr_at(9.0, cfg) > 0  # fine-tuning keeps the last epoch's LR
