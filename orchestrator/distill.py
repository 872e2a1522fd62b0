"""Knowledge distillation from a teacher while the masks are frozen (Hinton et al. 2015,
"Distilling the knowledge in a neural network"): the student's loss is

    (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

`pruning.teacher` names the teacher: a finished run's `final/` directory (or any directory that
`pruning.save_compact` wrote), or `self`: this run's own weights just before its first mask event
(meant for runs that start from `model.pretrained`; from scratch that model has seen little
data). `self` rides in the checkpoint's carry directory and reaches the other ranks by a
broadcast from rank 0 when a run resumes. The teacher costs one extra forward pass per step.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .collectives import broadcast_bytes

SELF_FILE = "teacher.pt"  # in the run's carry directory


class Teacher:
    """A frozen copy of a model, in eval mode, on the student's device and dtype."""

    def __init__(self, model: nn.Module, like: nn.Module):
        p = next(like.parameters())
        self.model = model.to(p.device, p.dtype).eval()
        for q in self.model.parameters():
            q.requires_grad_(False)

    def loss(self, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, alpha: float,
             temperature: float) -> torch.Tensor:
        with torch.no_grad():
            target = self.model(inputs).float()
        t = temperature
        kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.softmax(target / t, dim=1),
                      reduction="batchmean") * (t * t)
        ce = F.cross_entropy(logits.float(), labels)
        return (1.0 - alpha) * ce + alpha * kd


def load_teacher(source: str, run) -> Teacher:
    """The teacher `source` names, for `run` (collective for `self`: rank 0 sends the weights)."""
    if source == "self":
        return _load_self(run)
    from pruning import load_compact

    from .storage import download_dir, is_uri

    path = download_dir(source, run.scratch / "teacher") if is_uri(source) else Path(source)
    model, _, _ = load_compact(path)
    return Teacher(model, run.model)


def save_self(run) -> None:
    """Keep this run's current weights as its `self` teacher (rank 0 writes the carry file)."""
    if run.rank == 0:
        from models import arch_spec

        from .model_setup import run_spec

        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                 for k, v in run.model.state_dict().items()}
        spec = run_spec(run.cfg, arch_spec(run.model))  # dense here: the first mask event is before any compaction
        torch.save({"spec": spec, "state": state}, Path(run.checkpoint_files) / SELF_FILE)


def _load_self(run) -> Teacher:
    data = None
    if run.rank == 0:
        path = Path(run.checkpoint_files) / SELF_FILE
        if not path.is_file():
            raise FileNotFoundError(f"pruning.teacher=self: no {SELF_FILE} in the run's checkpoint (it is written "
                                    f"at the first mask event)")
        data = path.read_bytes()
    data = broadcast_bytes(data, src=0)  # sync point
    from pruning.respec import build

    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = build(saved["spec"])  # registered or user model
    model.load_state_dict(saved["state"], strict=True)
    return Teacher(model, run.model)
