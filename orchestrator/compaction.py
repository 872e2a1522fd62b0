"""Train-time compaction: go on training the hard-compacted model without losing the optimizer.

DeepSpeed cannot reshape an engine, so the compacted model needs a new one; a new engine has no
optimizer state, and SGD's momentum or Adam's moments would start again from zero (a transient
the frozen-mask fine-tuning or PFEC's retraining pays for). Instead:

1. gather the old engine's full state on every rank (`engine_state.gather`: the fp32 masters, the
   BN buffers, every parameter's moments, the step counters, the loss scale, the LRs; a
   collective under ZeRO 1/2 that leaves the full tensors on every rank anyway);
2. rebuild the dense model on CPU from the fp32 masters (not the bf16/fp16 module copy) and
   compact it in hard mode (a traced user model compacts into an fx.GraphModule; its spec, which
   the checkpoint keeps, names the factory and its kwargs, so a resumed run rebuilds that shape
   through pruning/respec.py);
3. cut every moment with the same kept channels as its parameter (`pruning.reslice`);
4. build the new engine and load the compacted state into it (`engine_state.load`: any ZeRO
   stage and precision).

In hard mode a pruned channel is exactly zero in the masked model (filter, BN weight and bias),
so the compacted model computes the same function and, given these moments, takes the same
optimizer step at every kept weight (tests/integration/test_train_compaction.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import engine_state

if TYPE_CHECKING:
    from .worker import Run

State = tuple[dict[str, torch.Tensor], dict[str, Any]]  # (model state, optimizer state), gather's form


def compacted_state(engine, groups, masks, input_size) -> tuple[nn.Module, dict, State]:
    """(compacted CPU model, its spec, its state for `engine_state.load`) of `engine`'s model
    under `masks`, hard mode. Collective: every rank calls it and gets the same result."""
    from pruning import compact
    from pruning.compact import compaction_index
    from pruning.reslice import slice_moments

    values, optimizer = engine_state.gather(engine, keep=True)  # sync point under ZeRO 1/2
    dense = dense_shell(engine.module)  # CPU, fp32: filled with the masters below
    dense.load_state_dict(values, strict=True)
    dense.train(engine.module.training)
    model, spec = compact(dense, groups, masks, mode="hard", input_size=input_size)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    moments = slice_moments(optimizer["moments"], compaction_index(dense, groups, masks, "hard"), shapes)
    # cloned: DeepSpeed casts the module it is given (bf16) before `load` writes the fp32 values
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    # the low-precision module copy is of the dense shapes: the new engine rounds the masters
    return model, spec, (state, dict(optimizer, moments=moments, module={}))


def dense_shell(module: nn.Module) -> nn.Module:
    """A CPU fp32 model of `module`'s (dense) shape whose every tensor is loaded next: a registered
    model built empty from its spec; a traced user model (no registry builder) copied."""
    if module.softprune_meta.family != "traced":
        from models import arch_spec
        from pruning.compact import empty_build

        return empty_build(arch_spec(module))
    import copy

    return copy.deepcopy(module).float().cpu()


def start_engine(model: nn.Module, cfg, world: int, state: State | None = None):
    """A new DeepSpeed engine around `model` holding `state` (the optimizer goes on where that
    state was). Collective: DeepSpeed's initialisation."""
    from .engine import build_engine

    engine = build_engine(model, cfg, world)  # sync point
    if state is not None:
        engine_state.load(engine, *state)
    return engine


def compact_run(run: Run, groups, masks) -> None:
    """Hard-compact the run's model and continue in a new engine with the optimizer state cut to
    the kept channels (`run.state.arch_spec` records the new shape). Collective."""
    from .model_setup import run_spec

    model, spec, state = compacted_state(run.engine, groups, masks, run.input_size)
    run.replace_model(model, run_spec(run.cfg, spec), state)  # sync point: DeepSpeed init
