"""A small corpus of your own, written in each input form the README's "Your own data" starts from:
a folder of images with a COCO captions JSON, img2dataset shards, and a text file. (Imported by
name: the suite's conftest modules share the module name ``conftest``.)"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

COLOURS = ("red", "green", "blue", "yellow", "purple", "black")
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
       "purple": (140, 60, 180), "black": (20, 20, 20)}


def jpeg(colour: str, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), RGB[colour]).save(buf, format="JPEG")
    return buf.getvalue()


def write_coco(root: Path, n_images: int = 12, corrupt: tuple[int, ...] = ()) -> tuple[Path, Path]:
    """``root/images/NNN.jpg`` and ``root/captions.json`` (COCO captions: two per image); the images
    numbered in ``corrupt`` are cut short. Returns (captions file, image folder)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": []}
    for i in range(n_images):
        colour = COLOURS[i % len(COLOURS)]
        data = jpeg(colour)
        (images / f"{i:03d}.jpg").write_bytes(data[:100] if i in corrupt else data)
        coco["images"].append({"id": 100 + i, "file_name": f"{i:03d}.jpg", "width": 32, "height": 32})
        for j, phrase in enumerate((f"a {colour} square", f"a picture that is all {colour}")):
            coco["annotations"].append({"id": 2 * i + j, "image_id": 100 + i, "caption": phrase})
    captions = root / "captions.json"
    captions.write_text(json.dumps(coco))
    return captions, images


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_img2dataset(folder: Path, shards: int = 2, per_shard: int = 8, *,
                      first_without_caption: bool = False) -> list[Path]:
    """Shards as img2dataset writes them: ``00000.tar`` holding ``KEY.jpg``, ``KEY.txt``, ``KEY.json``
    per sample (KEY = shard number and index), with ``00000.parquet`` and ``00000_stats.json``
    beside each. ``first_without_caption``: the first sample of the first shard lacks its .txt
    (a sample whose caption was lost)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            colour = COLOURS[(s * per_shard + i) % len(COLOURS)]
            members.append((f"{key}.jpg", jpeg(colour)))
            if not (first_without_caption and s == 0 and i == 0):
                members.append((f"{key}.txt", f"a {colour} photo from the web".encode()))
            members.append((f"{key}.json", json.dumps({"key": key, "status": "success"}).encode()))
        paths.append(write_tar(folder / f"{s:05d}.tar", members))
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not read by xfm_scale PAR1")
    return paths


def write_text(path: Path, n: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"the {COLOURS[i % len(COLOURS)]} cat number {i} sits near the river" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path

