"""tools/plot_run.py: a run's metrics.jsonl -> a PNG of the losses and the retrieval against chance."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xfm_scale.cli import plot_run
from xfm_scale.cli.plot_run import COLOURS, SIZE, read_metrics

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def write_metrics(folder: Path, evals: bool = True) -> Path:
    """A run of 300 steps as the trainer logs it: loss windows every 100 steps (text steps carry
    MLM, pair steps ITC/ITM/IMLM/MIM), evaluations at 150 and 300, and a resume that logged step 300
    again (the later record counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for step, scale in ((100, 1.0), (200, 0.6), (300, 0.9)):
        records.append({"step": step, "loss/total": 5 * scale, "loss/mlm": 4 * scale, "loss/itc": 3 * scale,
                        "loss/itm": 0.6 * scale, "loss/imlm": 4.5 * scale, "loss/mim": 0.05 * scale,
                        "lr": 1e-3, "samples_per_s/all": 100.0})
        if evals and step in (200, 300):
            r1 = 0.1 if step == 200 else 0.3
            records.append({"step": step - 50 if step == 200 else step, "eval/i2t_r1": r1, "eval/t2i_r1": r1 + 0.02,
                            "eval/i2t_r5": 2 * r1, "eval/t2i_r5": 2 * r1 + 0.05, "eval/mlm_acc": 0.5,
                            "eval/pairs": 200.0, "eval/chance_r1": 0.005})
    records.append({"step": 300, "loss/total": 2.5, "loss/mlm": 2.0, "loss/itc": 1.5, "loss/itm": 0.3,
                    "loss/imlm": 2.2, "loss/mim": 0.025})  # the resumed run's log of step 300
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_metrics_keeps_every_objective_in_step_order_and_the_last_record_of_a_step(tmp_path):
    m = read_metrics(write_metrics(tmp_path / "run"))
    assert list(m.losses) == ["mlm", "itc", "itm", "imlm", "mim"]  # loss/total is not an objective
    assert m.losses["itc"] == [(100, 3.0), (200, 3 * 0.6), (300, 1.5)]
    assert m.retrieval["eval/i2t_r1"] == [(150, 0.1), (300, 0.3)]
    assert list(m.retrieval) == ["eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r5", "eval/t2i_r5"]
    assert m.pairs == 200


def _pixels_near(img: np.ndarray, colour, tol: int = 40) -> int:
    return int((np.abs(img.astype(int) - np.array(colour)).sum(-1) < tol).sum())


def test_the_tool_writes_a_png_of_the_set_size_with_both_plots(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run)
    assert plot_run.main([str(run), "--ceiling", "0.9", "--title", "a run"]) == 0
    out = run / "summary.png"  # the default place
    assert capsys.readouterr().out.strip() == str(out)
    img = Image.open(out)
    assert img.format == "PNG" and img.size == SIZE and img.mode == "RGB"
    pixels = np.asarray(img)
    left, right = pixels[:, : SIZE[0] // 2], pixels[:, SIZE[0] // 2:]
    for objective in ("mlm", "itc", "itm", "imlm", "mim"):  # a line of each loss on the left
        assert _pixels_near(left, COLOURS[objective]) > 150, objective
    for key in ("eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r5", "eval/t2i_r5"):  # each recall on the right only
        assert _pixels_near(right, COLOURS[key]) > 100, key
        assert _pixels_near(left, COLOURS[key]) == 0, key
    # the ceiling: a dark dashed line across the retrieval plot, which a picture without it lacks
    plot_run.main([str(run), "--out", str(tmp_path / "no_ceiling.png")])
    without = np.asarray(Image.open(tmp_path / "no_ceiling.png"))[:, SIZE[0] // 2:]
    dark = lambda part: int((part.max(-1) < 90).sum())  # noqa: E731
    assert dark(right) - dark(without) > 200


def test_a_run_without_evaluations_still_gets_its_loss_plot(tmp_path):
    path = write_metrics(tmp_path / "run", evals=False)
    out = plot_run.plot_run(path, tmp_path / "elsewhere" / "p.png")  # the metrics file itself also works
    img = np.asarray(Image.open(out))
    assert img.shape == (SIZE[1], SIZE[0], 3)
    assert _pixels_near(img[:, : SIZE[0] // 2], COLOURS["itc"]) > 150
    assert _pixels_near(img[:, SIZE[0] // 2:], COLOURS["eval/i2t_r1"], tol=10) == 0


@pytest.mark.parametrize("content, args, message", [
    (None, [], "does not exist; give a run folder"),
    ('{"step": 1, "loss/mlm": 2.0}\nnot json\n', [], "metrics.jsonl:2: not a metrics record"),
    ('{"step": 1, "loss/mlm": 2.0}\n', ["--ceiling", "20"], "--ceiling 20.0 is not a share between 0 and 1"),
])
def test_bad_input_exits_2_naming_the_fix(tmp_path, capsys, content, args, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert plot_run.main([str(run / "metrics.jsonl"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "summary.png").exists()


def test_the_tools_wrapper_runs_the_same_tool(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    out = subprocess.run([sys.executable, str(ROOT / "tools/plot_run.py"), str(run), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "x.png").size == SIZE
