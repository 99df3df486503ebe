"""Progress a person can read: plain lines every N steps in a log file (no carriage returns), a
bar on a terminal, and the total loss per micro-batch kind."""
from __future__ import annotations

import io

import pytest

from xfm_scale.train.progress import Progress, format_duration

pytestmark = pytest.mark.unit


def test_a_log_file_gets_one_plain_line_every_n_steps_and_at_the_end():
    out = io.StringIO()
    progress = Progress(total=7, initial=0, enabled=True, every=3, stream=out, terminal=False)
    for step, kind in zip(range(1, 8), ["text", "pair", "image", "pair", "text", "pair", "text"]):
        progress.update(step, {kind: float(step)})
    progress.message("checkpoint saved: runs/x/checkpoints/step00000007")
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" | ")[0] for line in lines[:3]] == ["step 3/7 (43%)", "step 6/7 (86%)", "step 7/7 (100%)"]
    assert lines[0].endswith("loss image 3.000 pair 2.000 text 1.000")  # the latest total of each kind
    assert lines[2].endswith("loss image 3.000 pair 6.000 text 7.000")
    assert lines[3] == "checkpoint saved: runs/x/checkpoints/step00000007"


def test_a_terminal_gets_a_bar_and_a_disabled_progress_prints_nothing():
    out = io.StringIO()
    progress = Progress(total=4, initial=1, enabled=True, every=1, stream=out, terminal=True)
    progress.update(2, {"pair": 8.25})
    progress.close()
    assert "\r" in out.getvalue() and "loss pair 8.250" in out.getvalue()
    quiet = io.StringIO()
    silent = Progress(total=4, initial=0, enabled=False, every=1, stream=quiet, terminal=False)
    silent.update(4, {"text": 1.0})
    silent.message("run finished")
    assert quiet.getvalue() == ""


def test_durations_read_as_a_person_says_them():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
