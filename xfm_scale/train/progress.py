"""Progress a person can read: a tqdm bar on a terminal, plain lines in a log file.

Each step trains one modality per micro-batch, so the total loss of consecutive steps jumps
between very different objectives (MLM on text, ITC+ITM+IMLM+MIM on pairs, MIM on images). The
progress shows the latest total loss per micro-batch kind instead (``text 5.2 pair 8.1``).

When the output is not a terminal (``make demo > log``, a cluster job's log) a carriage-return
bar would write every redraw into the file; there one plain line is printed every
``every`` steps and at the last step.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Rank 0's progress over optimizer steps ``initial``..``total``."""

    def __init__(self, total: int, initial: int, *, enabled: bool, every: int, stream: TextIO | None = None,
                 terminal: bool | None = None):
        self.total, self.step, self.every, self.enabled = total, initial, max(1, every), enabled
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.losses: dict[str, float] = {}
        self.started, self.started_at = time.monotonic(), initial
        self.bar = None
        if enabled and self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="pretrain", dynamic_ncols=True, file=self.stream)

    def losses_text(self) -> str:
        return " ".join(f"{kind} {loss:.3f}" for kind, loss in sorted(self.losses.items()))

    def update(self, step: int, loss_by_kind: dict[str, float]) -> None:
        """Step ``step`` is done; ``loss_by_kind``: its total loss per micro-batch kind it trained."""
        self.step = step
        self.losses.update(loss_by_kind)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {self.losses_text()}")
        elif step % self.every == 0 or step == self.total:
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        done = self.step - self.started_at
        elapsed = time.monotonic() - self.started
        rate = elapsed / done if done else 0.0
        eta = rate * (self.total - self.step)
        return (f"step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%) | {rate:.2f} s/step | "
                f"eta {format_duration(eta)} | loss {self.losses_text()}")

    def message(self, text: str) -> None:
        """A line between the bar's redraws (checkpoint saved, evaluation), or a plain line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
