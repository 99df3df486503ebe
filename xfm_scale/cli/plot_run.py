"""Draw a run's summary picture from its metrics file: each objective's loss over the steps, and
the held-out retrieval R@1/R@5 at each evaluation against chance.

  python tools/plot_run.py RUN_DIR [--out PNG] [--ceiling SHARE] [--title TEXT]

RUN_DIR is a run's train.output_dir (or its metrics.jsonl itself); the picture goes to
RUN_DIR/summary.png unless --out says otherwise. The trainer writes metrics.jsonl: one JSON object
per logged step (``loss/<objective>``, the mean over the steps since the last log) and one per
evaluation (``eval/i2t_r1``, ``eval/t2i_r5``, ..., ``eval/chance_r1``). A resumed run appends to it;
a step logged twice is drawn with its last record. Pillow only (no plotting library).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (1200, 520)
"""Width and height of the picture in pixels."""
OBJECTIVES = ("mlm", "itc", "itm", "imlm", "mim")
"""The losses drawn, in this order (any other ``loss/*`` key except ``total`` follows)."""
RETRIEVAL = (("eval/i2t_r1", "image->text R@1"), ("eval/t2i_r1", "text->image R@1"),
             ("eval/i2t_r5", "image->text R@5"), ("eval/t2i_r5", "text->image R@5"))
COLOURS = {"mlm": (31, 119, 180), "itc": (214, 39, 40), "itm": (44, 160, 44), "imlm": (148, 103, 189),
           "mim": (255, 127, 14),
           # retrieval: teal image->text, brown text->image; dark R@1, light R@5
           "eval/i2t_r1": (1, 102, 94), "eval/t2i_r1": (140, 81, 10),
           "eval/i2t_r5": (110, 200, 185), "eval/t2i_r5": (216, 179, 101)}
OTHER_COLOURS = ((140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
GREY, DARK = (120, 120, 120), (30, 30, 30)
SCALE = 2  # drawn at twice the size, then downsampled: smooth lines without antialiasing support


@dataclass
class RunMetrics:
    """What the picture shows, read from a metrics.jsonl."""
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Objective name -> (step, loss) in step order."""
    retrieval: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """``eval/i2t_r1`` ... -> (step, recall) in step order."""
    pairs: int | None = None
    """Held-out pairs of the last evaluation (chance: 1/pairs at R@1, 5/pairs at R@5)."""


def metrics_path(run: str | Path) -> Path:
    """The metrics.jsonl of a run folder (or the path itself when it is the file)."""
    run = Path(run)
    return run / "metrics.jsonl" if run.is_dir() else run


def read_metrics(path: str | Path) -> RunMetrics:
    """Losses and retrieval series from a metrics.jsonl; a step logged twice (a resumed run
    re-logs the steps after its checkpoint) keeps its last record."""
    losses: dict[str, dict[int, float]] = {}
    retrieval: dict[str, dict[int, float]] = {}
    pairs = None
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a metrics record (JSON with a 'step'): {line[:80]!r}") from None
        for key, value in record.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if key.startswith("loss/") and key != "loss/total":
                losses.setdefault(key[len("loss/"):], {})[step] = float(value)
            elif key in dict(RETRIEVAL):
                retrieval.setdefault(key, {})[step] = float(value)
        if "eval/pairs" in record:
            pairs = int(record["eval/pairs"])
        elif "eval/chance_r1" in record and record["eval/chance_r1"] > 0:
            pairs = round(1 / record["eval/chance_r1"])
    order = [k for k in OBJECTIVES if k in losses] + sorted(k for k in losses if k not in OBJECTIVES)
    return RunMetrics(losses={k: sorted(losses[k].items()) for k in order},
                      retrieval={k: sorted(retrieval[k].items()) for k, _ in RETRIEVAL if k in retrieval},
                      pairs=pairs)


# ---- drawing --------------------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k apart, at least 1 with ``integer``) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    step = max(step, 1.0) if integer else step
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


class Panel:
    """One plot: a box in the picture with data->pixel transforms (log or linear y)."""

    def __init__(self, image: Image.Image, box: tuple[int, int, int, int], x_range: tuple[float, float],
                 y_range: tuple[float, float], log_y: bool):
        self.image, self.draw, self.box, self.log_y = image, ImageDraw.Draw(image), box, log_y
        self.drawn: list[tuple[float, float]] = []  # pixels along every line: where the legend should not go
        self.x0, self.x1 = x_range
        self.y0, self.y1 = (math.log10(y_range[0]), math.log10(y_range[1])) if log_y else y_range

    def xy(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        y = math.log10(max(y, 1e-12)) if self.log_y else y
        px = left + (x - self.x0) / ((self.x1 - self.x0) or 1) * (right - left)
        py = bottom - (y - self.y0) / ((self.y1 - self.y0) or 1) * (bottom - top)
        return px, py

    def axes(self, title: str, x_label: str, y_label: str, font, small) -> None:
        d, (left, top, right, bottom) = self.draw, self.box
        if self.log_y:
            ticks = [10.0 ** e * m for e in range(math.floor(self.y0) - 1, math.ceil(self.y1) + 1) for m in (1, 2, 5)]
            ticks = [t for t in ticks if self.y0 - 1e-9 <= math.log10(t) <= self.y1 + 1e-9]
        else:
            ticks = [t for t in _nice_ticks(self.y0, self.y1, 6) if self.y0 - 1e-9 <= t <= self.y1 + 1e-9]
        for t in ticks:
            _, py = self.xy(self.x0, t)
            d.line([(left, py), (right, py)], fill=(232, 232, 232), width=SCALE)
            d.text((left - 8 * SCALE, py), _label(t), fill=DARK, font=small, anchor="rm")
        for t in _nice_ticks(self.x0, self.x1, 6, integer=True):
            if self.x0 - 1e-9 <= t <= self.x1 + 1e-9:
                px, _ = self.xy(t, self.y1 if not self.log_y else 10 ** self.y1)
                d.line([(px, bottom), (px, bottom + 5 * SCALE)], fill=DARK, width=SCALE)
                d.text((px, bottom + 8 * SCALE), _label(t), fill=DARK, font=small, anchor="mt")
        d.rectangle(self.box, outline=DARK, width=SCALE)
        d.text(((left + right) / 2, top - 10 * SCALE), title, fill=DARK, font=font, anchor="mb")
        d.text(((left + right) / 2, bottom + 30 * SCALE), x_label, fill=DARK, font=small, anchor="mt")
        label = Image.new("RGBA", (int(d.textlength(y_label, font=small)) + 4, 20 * SCALE), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((2, 10 * SCALE), y_label, fill=DARK, font=small, anchor="lm")
        label = label.rotate(90, expand=True)
        self.image.paste(label, (int(left - 62 * SCALE), int((top + bottom - label.height) / 2)), label)

    def line(self, points: list[tuple[int, float]], colour, width: int = 2, dashed: bool = False,
             markers: bool = False) -> None:
        pixels = [self.xy(x, y) for x, y in points]
        for (ax, ay), (bx, by) in zip(pixels, pixels[1:]):
            n = max(2, int(math.dist((ax, ay), (bx, by)) / (4 * SCALE)))
            self.drawn += [(ax + (bx - ax) * i / n, ay + (by - ay) * i / n) for i in range(n + 1)]
        self.drawn += pixels
        if dashed:
            for a, b in zip(pixels, pixels[1:]):
                _dashes(self.draw, a, b, colour, width * SCALE)
        elif len(pixels) > 1:
            self.draw.line(pixels, fill=colour, width=width * SCALE, joint="curve")
        if markers or len(pixels) == 1:
            r = (width + 2) * SCALE
            for px, py in pixels:
                self.draw.ellipse((px - r, py - r, px + r, py + r), fill=colour)

    def legend(self, entries: list[tuple[str, tuple, bool]], font) -> None:
        """Entries (text, colour, dashed) in a box in the panel's corner that covers the fewest
        points of the lines drawn (top right on a tie)."""
        d, (left, top, right, bottom) = self.draw, self.box
        row, swatch, margin = 20 * SCALE, 26 * SCALE, 8 * SCALE
        width = max(d.textlength(text, font=font) for text, _, _ in entries) + swatch + 22 * SCALE
        height = row * len(entries) + 8 * SCALE
        corners = [(right - margin - width, top + margin), (left + margin, top + margin),
                   (right - margin - width, bottom - margin - height), (left + margin, bottom - margin - height)]
        x0, y0 = min(corners, key=lambda c: sum(c[0] - margin <= px <= c[0] + width + margin
                                                 and c[1] - margin <= py <= c[1] + height + margin
                                                 for px, py in self.drawn))
        d.rectangle((x0, y0, x0 + width, y0 + height), fill=(255, 255, 255), outline=GREY, width=SCALE)
        for i, (text, colour, dashed) in enumerate(entries):
            y = y0 + 4 * SCALE + row * i + row / 2
            a, b = (x0 + 6 * SCALE, y), (x0 + 6 * SCALE + swatch, y)
            if dashed:
                _dashes(d, a, b, colour, 2 * SCALE)
            else:
                d.line([a, b], fill=colour, width=3 * SCALE)
            d.text((b[0] + 8 * SCALE, y), text, fill=DARK, font=font, anchor="lm")


def _dashes(d: ImageDraw.ImageDraw, a, b, colour, width: int, on: float = 8 * SCALE, off: float = 6 * SCALE) -> None:
    length = math.dist(a, b)
    if length == 0:
        return
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    t = 0.0
    while t < length:
        e = min(t + on, length)
        d.line([(a[0] + ux * t, a[1] + uy * t), (a[0] + ux * e, a[1] + uy * e)], fill=colour, width=width)
        t = e + off


def _x_range(series: list[list[tuple[int, float]]]) -> tuple[float, float]:
    steps = [s for points in series for s, _ in points]
    lo, hi = (min(steps), max(steps)) if steps else (0, 1)
    return (0.0, float(hi)) if hi > 0 else (float(lo), float(lo) + 1.0)


def draw_summary(metrics: RunMetrics, out: str | Path, *, title: str | None = None, ceiling: float | None = None,
                 size: tuple[int, int] = SIZE) -> Path:
    """Write the two-panel picture (losses, log scale; retrieval against chance) to ``out``."""
    width, height = size[0] * SCALE, size[1] * SCALE
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font, small = _font(15 * SCALE), _font(12 * SCALE)
    if title:
        d.text((width / 2, 8 * SCALE), title, fill=DARK, font=_font(17 * SCALE), anchor="mt")
    top, bottom = 64 * SCALE, height - 62 * SCALE
    half = width // 2
    loss_box = (86 * SCALE, top, half - 30 * SCALE, bottom)
    eval_box = (half + 86 * SCALE, top, width - 30 * SCALE, bottom)

    # losses
    values = [v for points in metrics.losses.values() for _, v in points if v > 0]
    if values:
        lo, hi = min(values), max(values)
        y_lo, y_hi = _floor_125(lo * 0.9), _ceil_125(hi * 1.1)  # a margin: no line on the frame
        panel = Panel(img, loss_box, _x_range(list(metrics.losses.values())), (y_lo, y_hi), log_y=True)
        panel.axes("training loss per objective", "optimizer step", "loss (log scale)", font, small)
        others = iter(OTHER_COLOURS)
        entries = []
        for name, points in metrics.losses.items():
            colour = COLOURS.get(name) or next(others, GREY)
            panel.line([(s, v) for s, v in points if v > 0], colour)
            entries.append((name.upper(), colour, False))
        panel.legend(entries, small)
    else:
        _empty(d, loss_box, "no loss records", font)

    # retrieval
    if metrics.retrieval:
        top_value = max(v for points in metrics.retrieval.values() for _, v in points)
        limits = ([top_value] + ([ceiling] if ceiling is not None else [])
                  + ([min(1.0, 5 / metrics.pairs)] if metrics.pairs else []))
        y_hi = min(1.05, max(0.1, math.ceil(max(limits) * 10 + 0.5) / 10))  # 1.05: a line at 1 stays visible
        panel = Panel(img, eval_box, _x_range(list(metrics.retrieval.values())), (0.0, y_hi), log_y=False)
        panel.axes(f"held-out zero-shot retrieval ({metrics.pairs or '?'} pairs)", "optimizer step",
                   "recall", font, small)
        x0, x1 = panel.x0, panel.x1
        entries = []
        for key, text in RETRIEVAL:
            if key in metrics.retrieval:
                panel.line(metrics.retrieval[key], COLOURS[key], markers=True)
                entries.append((text, COLOURS[key], False))
        if metrics.pairs:
            for k, colour in ((1, GREY), (5, (175, 175, 175))):
                chance = min(1.0, k / metrics.pairs)
                panel.line([(x0, chance), (x1, chance)], colour, dashed=True)
                entries.append((f"chance R@{k} ({chance:.1%})", colour, True))
        if ceiling is not None:
            panel.line([(x0, ceiling), (x1, ceiling)], DARK, dashed=True)
            entries.append((f"ceiling R@1 ({ceiling:.0%} unique content)", DARK, True))
        panel.legend(entries, small)
    else:
        _empty(d, eval_box, "no evaluation records (data.eval_manifest, train.eval_every)", font)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.resize(size, Image.LANCZOS).save(out, format="PNG", optimize=True)
    return out


def _floor_125(value: float) -> float:
    """The largest of 1, 2, 5 x 10^k at or below ``value``."""
    e = math.floor(math.log10(value))
    return max(m * 10.0 ** e for m in (1, 2, 5) if m * 10.0 ** e <= value * (1 + 1e-9))


def _ceil_125(value: float) -> float:
    """The smallest of 1, 2, 5, 10 x 10^k at or above ``value``."""
    e = math.floor(math.log10(value))
    return min(m * 10.0 ** e for m in (1, 2, 5, 10) if m * 10.0 ** e >= value * (1 - 1e-9))


def _empty(d: ImageDraw.ImageDraw, box, text: str, font) -> None:
    d.rectangle(box, outline=GREY, width=SCALE)
    d.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill=GREY, font=font, anchor="mm")


def plot_run(run: str | Path, out: str | Path | None = None, *, title: str | None = None,
             ceiling: float | None = None) -> Path:
    """The picture of the run at ``run`` (folder or metrics.jsonl); returns its path."""
    path = metrics_path(run)
    out = Path(out) if out else path.parent / "summary.png"
    return draw_summary(read_metrics(path), out, title=title, ceiling=ceiling)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run's output folder (train.output_dir) or its metrics.jsonl")
    p.add_argument("--out", help="the PNG to write (default: RUN/summary.png)")
    p.add_argument("--title", help="a line above the two plots")
    p.add_argument("--ceiling", type=float, help="draw this R@1 ceiling (a share, 0-1) on the retrieval plot")
    args = p.parse_args(argv)
    path = metrics_path(args.run)
    if not path.is_file():
        print(f"error: {path} does not exist; give a run folder (its train.output_dir) or its metrics.jsonl",
              file=sys.stderr)
        return 2
    if args.ceiling is not None and not 0 <= args.ceiling <= 1:
        print(f"error: --ceiling {args.ceiling} is not a share between 0 and 1", file=sys.stderr)
        return 2
    try:
        out = plot_run(path, args.out, title=args.title, ceiling=args.ceiling)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
