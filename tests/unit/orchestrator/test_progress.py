"""The progress line a person reads: what it holds, and silence on other ranks."""

from __future__ import annotations

from orchestrator.progress import Progress, _clock

METRICS = {"train_loss": 1.23456, "lr": 0.1, "img_per_s": 812.4}


def test_the_epoch_line_holds_what_a_person_follows(capsys):
    p = Progress(total_epochs=10, first_epoch=0, enabled=True)
    p.start -= 60.0  # one epoch took a minute
    p.epoch(0, METRICS, {"top1": 0.5, "top5": 0.75}, {"rate": 0.3, "macs_kept": 0.581})
    line = capsys.readouterr().out.strip()
    assert line.startswith("[softprune] epoch 1/10  loss 1.2346  lr 0.1  top1 0.5000  top5 0.7500  812 img/s")
    assert "prune rate 0.300" in line and "MACs kept 58.1%" in line
    assert "elapsed 1m00s" in line and "ETA 9m00s" in line  # nine epochs left at a minute each
    assert "\n" not in line


def test_a_resumed_run_estimates_from_its_own_epochs(capsys):
    p = Progress(total_epochs=10, first_epoch=8, enabled=True)  # resumed before epoch 9 of 10
    p.start -= 30.0
    p.epoch(8, METRICS, {}, {})
    line = capsys.readouterr().out
    assert "ETA 0m30s" in line and "top1" not in line and "prune rate" not in line and "MACs" not in line


def test_other_ranks_print_nothing(capsys):
    p = Progress(total_epochs=3, first_epoch=0, enabled=False, every_s=0.0)
    p.epoch(0, METRICS, {"top1": 0.1, "top5": 0.2}, {})
    assert not p.due()
    assert capsys.readouterr().out == ""


def test_step_lines_are_spaced_in_time(capsys):
    p = Progress(total_epochs=3, first_epoch=0, enabled=True, every_s=3600.0)
    assert not p.due()
    p.every_s = 0.0
    assert p.due()
    p.step(1, 50, 200, 2.5, 0.01)
    assert capsys.readouterr().out.startswith("[softprune] epoch 2/3  step 50/200  loss 2.5000  lr 0.01")


def test_clock():
    assert _clock(59) == "0m59s" and _clock(3 * 3600 + 125) == "3h02m" and _clock(-5) == "0m00s"
