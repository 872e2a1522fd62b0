"""The line a person follows in the terminal: one per epoch, and a short one now and then within
long epochs. Rank 0 prints; every other rank gets a printer that prints nothing.
"""

from __future__ import annotations

import time
from typing import Any


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Formats and prints progress lines; `every_s` spaces the within-epoch lines out in time."""

    def __init__(self, total_epochs: int, first_epoch: int, enabled: bool, every_s: float = 60.0):
        self.total, self.first, self.enabled, self.every_s = total_epochs, first_epoch, enabled, every_s
        self.start = self.last = time.monotonic()

    def _eta(self, epochs_done: float) -> str:
        elapsed = time.monotonic() - self.start
        ran = epochs_done - self.first  # epochs this invocation ran: a resumed run's rate is its own
        left = self.total - epochs_done
        return _clock(elapsed / ran * left) if ran > 0 else "?"

    def step(self, epoch: int, step: int, steps: int, loss: float, lr: float) -> None:
        """Within an epoch: at most one line every `every_s` seconds (callers check `due()` first)."""
        self.last = time.monotonic()
        print(f"[softprune] epoch {epoch + 1}/{self.total}  step {step}/{steps}  loss {loss:.4f}  lr {lr:.4g}  "
              f"elapsed {_clock(self.last - self.start)}  ETA {self._eta(epoch + step / max(steps, 1))}", flush=True)

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self.last >= self.every_s

    def epoch(self, epoch: int, metrics: dict[str, Any], evaluation: dict[str, float], prune: dict[str, Any]) -> None:
        """The epoch's line: loss, lr, accuracy, speed, pruning state, time."""
        if not self.enabled:
            return
        self.last = time.monotonic()
        parts = [f"epoch {epoch + 1}/{self.total}", f"loss {metrics['train_loss']:.4f}", f"lr {metrics['lr']:.4g}"]
        if evaluation:
            parts.append(f"top1 {evaluation['top1']:.4f}  top5 {evaluation['top5']:.4f}")
        parts.append(f"{metrics['img_per_s']:.0f} img/s")
        if prune.get("rate") is not None:
            parts.append(f"prune rate {prune['rate']:.3f}")
        if prune.get("macs_kept") is not None:
            parts.append(f"MACs kept {prune['macs_kept']:.1%}")
        parts.append(f"elapsed {_clock(self.last - self.start)}  ETA {self._eta(epoch + 1)}")
        print("[softprune] " + "  ".join(parts), flush=True)
