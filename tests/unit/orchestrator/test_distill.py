"""The distillation loss: cross-entropy at alpha 0, a pure teacher term at alpha 1 that vanishes
when student and teacher agree, and no gradient into the teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.distill import Teacher


def _pair():
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4)
    return student, Teacher(teacher, student), torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_the_teacher_term():
    student, teacher, x, y = _pair()
    logits = student(x)
    assert teacher.loss(x, logits, y, 0.0, 4.0).item() == pytest.approx(F.cross_entropy(logits, y).item())
    same = Teacher(nn.Linear(6, 4), student)
    same.model.load_state_dict(student.state_dict())
    assert same.loss(x, logits, y, 1.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert teacher.loss(x, logits, y, 1.0, 4.0).item() > 1e-4


def test_the_teacher_gets_no_gradient():
    student, teacher, x, y = _pair()
    teacher.loss(x, student(x), y, 0.5, 2.0).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(q.grad is None for q in teacher.model.parameters())
