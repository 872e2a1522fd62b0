"""Writing a folded model (see fold.py) as a file that runs without this project, and running it.

  onnx         `torch.onnx.export(dynamo=True)`, one self-contained file (no external data),
               dynamic batch axis; runs with onnxruntime alone. The dynamo exporter is the one
               torch maintains (the TorchScript-based one is deprecated); it goes through
               torch.export, like pt2, and its optimiser folds the faithful constant-kernel
               convolutions into constants at the exported input size.
  torchscript  `torch.jit.trace` + `torch.jit.freeze`; loads with `torch.jit.load` alone.
  pt2          `torch.export.export` with a dynamic batch, `torch.export.save`; loads with
               `torch.export.load(path).module()` alone.
The spatial input size is the one exported at (ONNX and pt2 specialise it); the batch is free.
onnx, onnxscript and onnxruntime are the optional `export` extra: imported only here, on use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
_EXAMPLE_BATCH = 2  # not 1: torch.export specialises a size-1 dimension
_ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


def require(fmt: str) -> None:
    """Fail with one line naming the extra to install when `fmt` needs a missing package."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "onnx":
        return
    missing = []
    for name in _ONNX_MODULES:  # imported, not just found: a broken install counts as missing
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)}: pip install 'softprune[export]' "
                         f"(or `pip install -e '.[export]'` in a checkout)")


def folded_for(model: nn.Module, fmt: str) -> nn.Module:
    """`fold_for_export(model)` as `fmt` runs it fastest. For ONNX the sfp policy's scatters go
    into their convs: onnxruntime ran the sfp-compacted ResNet-50 1.2-1.3x faster so at batch 8
    (one and two threads, P=0.3 to 0.7). Torch formats keep the gather: in eager torch the wider
    convs were 7-11% slower at batch 1 and level to 8% faster at batch 8 (docs/results.md,
    "Compact latency")."""
    from pruning.fold import fold_for_export

    return fold_for_export(model, scatter_into_conv=fmt == "onnx")


def runtime_name(fmt: str) -> str:
    if fmt == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__} ({'torch.jit' if fmt == 'torchscript' else 'torch.export'})"


def write(model: nn.Module, fmt: str, path: str | Path, input_size: int | tuple[int, int]) -> Path:
    """Write `model` (eval mode, standard ops: `fold_for_export`'s output) to `path` as `fmt`."""
    require(fmt)
    path = Path(path)
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    p = next(model.parameters())
    x = torch.randn(_EXAMPLE_BATCH, 3, h, w, dtype=p.dtype, device=p.device)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporters' deprecation and tracer chatter
        {"onnx": _onnx, "torchscript": _torchscript, "pt2": _pt2}[fmt](model, x, path)
    return path


def _batch_dim() -> dict:
    return {"x": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}


def _onnx(model: nn.Module, x: Tensor, path: Path) -> None:
    import contextlib
    import io
    import logging

    # the exporter's progress lines, and its notes on torchvision ops it cannot register
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["logits"],
                              dynamo=True, external_data=False, dynamic_shapes=_batch_dim())
    finally:
        quiet.setLevel(level)


def _torchscript(model: nn.Module, x: Tensor, path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(model, x))
    traced.save(str(path))


def _pt2(model: nn.Module, x: Tensor, path: Path) -> None:
    program = torch.export.export(model, (x,), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path))


def load_runner(fmt: str, path: str | Path, threads: int = 0) -> Callable[[Tensor], Tensor]:
    """The exported file loaded the way a deployer loads it: a function from an input batch
    (float32 tensor) to the output tensor. `threads` > 0 sets onnxruntime's intra-op threads
    (0: its default, every core); torch formats use torch's own setting (`torch.set_num_threads`).
    On the 2-core CPU measured, a compacted ResNet-50 ran at its MACs in onnxruntime with one
    thread and at 0.83 of them with two: its narrower convs split worse (docs/results.md)."""
    require(fmt)
    path = str(path)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        run_onnx.session = session  # for callers that inspect or reuse it
        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: TorchScript is deprecated
        module = torch.jit.load(path) if fmt == "torchscript" else torch.export.load(path).module()

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module(x)

    return run
