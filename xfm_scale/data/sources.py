"""Readers of raw corpora: each yields webdataset records (dicts) or :class:`Skip` with a reason.

Formats:
* text:  ``.jsonl`` (one object per line, text in ``text_field``) or plain lines (any other file).
* image: a folder (searched recursively for image files) or a list file (one path per line).
* pair:  ``.jsonl`` / ``.json`` list (``image`` path or ``image_base64`` bytes, plus ``caption``:
  a string or a list of strings), ``.tsv`` (header naming the columns, or two columns
  ``image<TAB>caption``), or a COCO caption file (``{"images": [...], "annotations": [...]}``).

Several captions of one image (a jsonl/json caption list, a COCO image's annotations) become,
with ``captions="per-sample"`` (the default), one sample per caption; with ``captions="all"``,
one sample per image: ``KEY.<img>`` + ``KEY.txt`` (the first caption, what every reader of pairs
reads) + ``KEY.captions.json`` (:data:`CAPTION_LIST_EXT`: a JSON list of all its captions, UTF-8),
which the loader draws from with ``caption_choice: draw`` and other webdataset readers keep as an
extra member (webdataset decodes it by its last extension, ``json``). An image with a single
caption is written as ``KEY.<img>`` + ``KEY.txt`` in both modes, and a TSV row is one caption.
Images are checked by decoding them fully with PIL once here, so a corrupt file is counted at
conversion time rather than discovered in training; the stored bytes are the original encoding.
Every :class:`Skip` names its record in ``detail`` (the image path, the line number), so that a
report can say which records were skipped and why.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Iterator

from PIL import Image

from .shards import IMAGE_EXTS, DataSpecError, Skip

Record = dict | Skip

CAPTION_MODES = ("per-sample", "all")
"""``read_pairs(captions=...)``: one sample per caption, or one per image holding all its captions."""
CAPTION_LIST_EXT = "captions.json"
"""The member holding a pair sample's caption list (``KEY.captions.json``, ``captions="all"``)."""


def _decode_line(raw: bytes, where: str = "") -> str | Skip:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return Skip("bad_utf8", where)


def _json_lines(path: Path) -> Iterator[tuple[str, dict | Skip]]:
    """``(where, object)`` per non-blank line; ``where`` is ``FILE:LINE``."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path.name}:{number}"
            line = _decode_line(raw, where)
            if isinstance(line, Skip):
                yield where, line
                continue
            if not line.strip():
                continue  # blank separator lines are not records
            try:
                obj = json.loads(line)
            except ValueError:
                yield where, Skip("bad_json", where)
                continue
            yield where, obj if isinstance(obj, dict) else Skip("bad_json", where)


def _fields(obj: dict) -> str:
    return ", ".join(sorted(map(str, obj))[:8]) or "none"


def read_text(path: str | Path, *, text_field: str = "text") -> Iterator[Record]:
    """Text records from a ``.jsonl`` file (``text_field``) or a plain file (one text per line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        for where, obj in _json_lines(path):
            if isinstance(obj, Skip):
                yield obj
            elif not isinstance(obj.get(text_field), str):
                yield Skip("missing_field", f"{where} has no string '{text_field}' (its fields: {_fields(obj)})")
            else:
                yield _text_record(obj[text_field], where)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decode_line(raw, f"{path.name}:{number}")
            yield line if isinstance(line, Skip) else _text_record(line, f"{path.name}:{number}")


def _text_record(text: str, where: str = "") -> Record:
    text = text.strip()
    return {"txt": text} if text else Skip("empty_text", where)


def check_image(data: bytes) -> str | Skip:
    """The webdataset extension for encoded image bytes, or a Skip if PIL cannot decode them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
            img.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        return Skip("bad_image")
    ext = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(fmt, fmt)
    return ext if ext in IMAGE_EXTS else Skip("bad_image")


def _image_from_path(path: Path) -> tuple[str, bytes] | Skip:
    try:
        data = path.read_bytes()
    except OSError:
        return Skip("missing_image_file", str(path))
    ext = check_image(data)
    return Skip(ext.reason, str(path)) if isinstance(ext, Skip) else (ext, data)


def read_images(path: str | Path) -> Iterator[Record]:
    """Image records from a folder (recursive, sorted) or a list file of paths (relative to it)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    else:
        files = [path.parent / line.strip() for line in path.read_text().splitlines() if line.strip()]
    for file in files:
        image = _image_from_path(file)
        yield image if isinstance(image, Skip) else {image[0]: image[1]}


def _pair_record(image_ref: str | None, image_b64: str | None, caption, root: Path, where: str = "") -> Record:
    """``where``: the record, named in a Skip's detail when no image path names it."""
    if isinstance(caption, str):
        caption = caption.strip()
    if not caption or not isinstance(caption, str):
        return Skip("empty_caption", where or (str(root / image_ref) if image_ref else ""))
    if image_b64:
        try:
            data = base64.b64decode(image_b64, validate=True)
        except (binascii.Error, ValueError):
            return Skip("bad_base64", where)
        ext = check_image(data)
        image = Skip(ext.reason, where) if isinstance(ext, Skip) else (ext, data)
    elif image_ref:
        image = _image_from_path(root / image_ref)
    else:
        return Skip("missing_field", where)
    return image if isinstance(image, Skip) else {image[0]: image[1], "txt": caption}


def _pair_with_captions(image_ref: str | None, image_b64: str | None, captions: list, root: Path,
                        where: str = "") -> Iterator[Record]:
    """One sample for an image and all its captions (``captions="all"``): ``txt`` the first,
    :data:`CAPTION_LIST_EXT` the list (when more than one is left). A blank or non-string caption
    is left out of the list and counted as ``empty_caption``, as it is one sample per caption."""
    kept = []
    for caption in captions:
        text = caption.strip() if isinstance(caption, str) else ""
        if text:
            kept.append(text)
        else:
            yield Skip("empty_caption", where or (str(root / image_ref) if image_ref else ""))
    if not kept:
        return
    record = _pair_record(image_ref, image_b64, kept[0], root, where)
    if len(kept) > 1 and not isinstance(record, Skip):
        record[CAPTION_LIST_EXT] = json.dumps(kept, ensure_ascii=False).encode("utf-8")
    yield record


def _expand_captions(obj: dict, root: Path, image_field: str, caption_field: str, where: str,
                     captions_mode: str = "per-sample") -> Iterator[Record]:
    captions = obj.get(caption_field)
    if captions is None:  # the field is not there: say which fields are
        yield Skip("empty_caption", f"{where} has no '{caption_field}' (its fields: {_fields(obj)})")
        return
    if obj.get(image_field) is None and obj.get(f"{image_field}_base64") is None:
        yield Skip("missing_field", f"{where} has no '{image_field}' or '{image_field}_base64' (its fields: "
                                    f"{_fields(obj)})")
        return
    where = where if obj.get(image_field) is None else ""  # an image path names the record
    if captions_mode == "all" and isinstance(captions, list):
        yield from _pair_with_captions(obj.get(image_field), obj.get(f"{image_field}_base64"), captions, root, where)
        return
    for caption in captions if isinstance(captions, list) else [captions]:
        yield _pair_record(obj.get(image_field), obj.get(f"{image_field}_base64"), caption, root, where)


def read_pairs(path: str | Path, *, image_root: str | Path | None = None, image_field: str = "image",
               caption_field: str = "caption", captions: str = "per-sample") -> Iterator[Record]:
    """Pair records from jsonl / json / tsv / COCO captions; image paths are relative to ``image_root``
    (default: the file's folder). ``captions``: ``per-sample`` (one record per caption) or ``all``
    (one record per image with its caption list; the module docstring gives the members)."""
    if captions not in CAPTION_MODES:
        raise DataSpecError(f"captions={captions!r}: use one of {', '.join(CAPTION_MODES)}")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix == ".jsonl":
        for where, obj in _json_lines(path):
            if isinstance(obj, Skip):
                yield obj
            else:
                yield from _expand_captions(obj, root, image_field, caption_field, where, captions)
    elif path.suffix == ".tsv":
        yield from _read_tsv(path, root, image_field, caption_field)
    else:
        data = _json_file(path)
        if isinstance(data, dict) and "annotations" in data:
            yield from _read_coco(data, root, path.name, captions)
        elif not isinstance(data, list):
            raise DataSpecError(f"--input {path} holds neither a list of records nor COCO captions ('images' and "
                                "'annotations'); give a .jsonl/.json list/.tsv/COCO captions file")
        else:
            for i, obj in enumerate(data):
                where = f"{path.name}[{i}]"
                yield from _expand_captions(obj, root, image_field, caption_field, where, captions) \
                    if isinstance(obj, dict) else [Skip("bad_json", where)]


def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataSpecError(f"--input {path} is not a JSON file ({type(exc).__name__}: {str(exc)[:80]}); give a "
                            ".jsonl/.json/.tsv/COCO captions file") from None


def read_captions(path: str | Path, *, caption_field: str = "caption") -> Iterator[str]:
    """Only the caption texts of a pair source (jsonl / json / tsv / COCO captions), without
    reading any image: what a tokenizer is trained on."""
    path = Path(path)
    if path.suffix == ".tsv":
        records = _read_tsv(path, path.parent, "image", caption_field, images=False)
    elif path.suffix == ".jsonl":
        records = (obj for _, obj in _json_lines(path))
    else:
        data = _json_file(path)
        records = data.get("annotations", []) if isinstance(data, dict) else data
    for obj in records:
        if not isinstance(obj, dict):
            continue
        captions = obj.get(caption_field)
        for caption in captions if isinstance(captions, list) else [captions]:
            if isinstance(caption, str) and caption.strip():
                yield caption.strip()


def _read_tsv(path: Path, root: Path, image_field: str, caption_field: str, *,
              images: bool = True) -> Iterator[Record]:
    """Pair records of a TSV file; ``images=False``: the rows as dicts (columns -> values)."""
    with open(path, "rb") as f:
        lines = iter(f)
        first = _decode_line(next(lines, b""), f"{path.name}:1")
        header = first.split("\t") if isinstance(first, str) else []
        if caption_field in header:
            columns = header
        else:  # no header: image<TAB>caption, and the first line is data
            columns, lines = [image_field, caption_field], _chain([first], lines)
        for number, raw in enumerate(lines, 1 if columns is not header else 2):
            where = f"{path.name}:{number}"
            line = raw if isinstance(raw, (str, Skip)) else _decode_line(raw, where)
            if isinstance(line, Skip):
                yield line
                continue
            if not line.strip():
                continue
            row = dict(zip(columns, line.split("\t")))
            if not images:
                yield row
                continue
            ref = row.get(image_field, "")
            b64 = row.get(f"{image_field}_base64")
            if b64 is None and len(ref) > 256 and not (root / ref[:200]).exists():
                ref, b64 = None, ref  # a long non-path image column is base64 bytes
            yield _pair_record(ref, b64, row.get(caption_field), root, where)


def _chain(first: list, rest):
    yield from first
    yield from rest


def _read_coco(data: dict, root: Path, name: str = "", captions: str = "per-sample") -> Iterator[Record]:
    """COCO captions: one sample per annotation (as X-VLM's pre-training json does), or
    (``captions="all"``) one per image holding its annotations' captions, in annotation order, the
    images in the order of their first annotation."""
    files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    grouped: dict = {}
    for i, ann in enumerate(data["annotations"]):
        file = files.get(ann.get("image_id"))
        if not file:
            yield Skip("missing_image_file",
                       f"{name} annotation #{i}: image_id {ann.get('image_id')!r} is not in 'images'")
        elif captions == "all":
            grouped.setdefault(ann["image_id"], []).append(ann.get("caption"))
        else:
            yield _pair_record(file, None, ann.get("caption"), root)
    for image_id, image_captions in grouped.items():
        yield from _pair_with_captions(files[image_id], None, image_captions, root)
