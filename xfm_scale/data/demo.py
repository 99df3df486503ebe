"""The embedded default corpus: a small procedural world a small model can really learn.

Images are drawn with PIL: 1-3 shapes of one kind and colour, placed at one of five positions,
on a light background shaded by position (:func:`background`); captions describe exactly that
(several phrasings). An image-only set, a text corpus (caption-like sentences plus other simple
sentences), a byte-level BPE tokenizer trained on the text with HF ``tokenizers`` (RoBERTa special
tokens <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), a held-out pair set for retrieval evaluation (scene
contents distinct while the world's 360 last: :func:`held_out_scenes`) and a blend spec over the
training sets. :func:`unique_content_share` is the retrieval ceiling of a held-out set.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from .shards import write_corpus

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 180), "black": (20, 20, 20)}
POSITIONS = ("left", "right", "top", "bottom", "centre")
COUNT_WORDS = ("one", "two", "three")
PHRASE_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "centre": "in the centre"}
TEMPLATES = ("{n} {colour} {shapes} {where}", "there {be} {n} {colour} {shapes} {where}",
             "a picture of {n} {colour} {shapes} {where}", "{where_cap} , {n} {colour} {shapes}",
             "an image with {n} {colour} {shapes} {where}")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass(kw_only=True)
class DemoData:
    """Paths of the built demo world."""
    root: Path
    """The output folder."""
    spec: Path
    """Blend spec (YAML) over the training corpora."""
    tokenizer_dir: Path
    """HF tokenizer folder (AutoTokenizer.from_pretrained(..., local_files_only=True))."""
    eval_manifest: Path
    """Manifest of the held-out pair set (retrieval evaluation)."""
    manifests: dict[str, Path]
    """Manifest per training corpus."""


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    count: int


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(POSITIONS), rng.randint(1, 3))


ALL_SCENES = tuple(Scene(shape, colour, position, count) for shape in SHAPES for colour in COLOURS
                   for position in POSITIONS for count in (1, 2, 3))
"""Every scene content the world has (4 shapes x 6 colours x 5 positions x 3 counts = 360)."""


def held_out_scenes(n: int, rng: random.Random) -> list[Scene]:
    """``n`` scenes for the held-out set, as distinct in content as ``n`` allows: without
    replacement from :data:`ALL_SCENES` (again from the full set for each further 360)."""
    scenes: list[Scene] = []
    while len(scenes) < n:
        scenes += rng.sample(ALL_SCENES, min(n - len(scenes), len(ALL_SCENES)))
    return scenes


def caption(scene: Scene, rng: random.Random) -> str:
    n = COUNT_WORDS[scene.count - 1] if scene.count > 1 or rng.random() < 0.5 else "a"
    where = PHRASE_POSITION[scene.position]
    return rng.choice(TEMPLATES).format(
        n=n, colour=scene.colour, shapes=scene.shape + ("s" if scene.count > 1 else ""),
        where=where, where_cap=where, be="are" if scene.count > 1 else "is")


COUNT_OF_WORD = {"a": 1, "one": 1, "two": 2, "three": 3}
PLURALS = {shape + "s": shape for shape in SHAPES}


def caption_content(text: str) -> tuple[int, str, str, str] | None:
    """What a demo caption says, whatever its phrasing: (count, colour, shape, position), or None
    for a sentence that is not a demo caption. Every template has "<count> <colour> <shape>"."""
    words = text.lower().replace(",", " ").split()
    for i, word in enumerate(words[1:-1], 1):
        shape = PLURALS.get(words[i + 1], words[i + 1])
        if word in COLOURS and words[i - 1] in COUNT_OF_WORD and shape in SHAPES:
            place = next((p for p in POSITIONS if p in words), None)
            return (COUNT_OF_WORD[words[i - 1]], word, shape, place) if place else None
    return None


def unique_content_share(captions: list[str]) -> float:
    """The share of captions whose content (count, colour, shape, position) no other caption of the
    list has: the pairs a model that reads all four can always retrieve first (the R@1 ceiling the
    demo prints; pairs that share content are told apart by chance only). A caption that is not a
    demo caption counts as not unique."""
    contents = [caption_content(c) for c in captions]
    counts: dict = {}
    for content in contents:
        counts[content] = counts.get(content, 0) + 1
    return sum(c is not None and counts[c] == 1 for c in contents) / len(contents) if contents else 0.0


def held_out_captions(eval_manifest: str | Path) -> list[str]:
    """The captions of a held-out pair set, in its order (read from its shards)."""
    from .shards import iter_tar_samples

    manifest = Path(eval_manifest)
    shards = json.loads(manifest.read_text())["shards"]
    return [sample["txt"].decode() if isinstance(sample["txt"], bytes) else sample["txt"]
            for shard in shards for sample in iter_tar_samples(manifest.parent / shard["name"])]


def background(size: int, rng: random.Random, shaded: bool = True) -> Image.Image:
    """A light background. Shaded (the default): redder to the right and bluer to the bottom, as a
    table lit from one corner, plus a small random tint; so every patch's pixels tell where in the
    image it is. The vision encoder (BEiT-v2 form) has no absolute position embedding, only a
    relative bias, and a tiny one does not learn "left" from the image border in a few minutes.
    Plain: one random light colour."""
    tint = [rng.randint(-6, 6) for _ in range(3)]
    if not shaded:
        return Image.new("RGB", (size, size), tuple(230 + t for t in tint))
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    x, y = ramp[None, :], ramp[:, None]
    rgb = np.stack(np.broadcast_arrays(175 + 75 * x + tint[0], np.full((size, size), 220.0 + tint[1]),
                                       175 + 75 * y + tint[2]), axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def draw(scene: Scene, size: int, rng: random.Random, shaded: bool = True) -> Image.Image:
    """Render at 2x and downsample (antialiasing at 32 px)."""
    s = 2 * size
    img = background(s, rng, shaded)
    d = ImageDraw.Draw(img)
    # The region of each position; shapes are spread along its long side.
    box = {"left": (0.0, 0.0, 0.45, 1.0), "right": (0.55, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.45),
           "bottom": (0.0, 0.55, 1.0, 1.0), "centre": (0.15, 0.3, 0.85, 0.7)}[scene.position]
    x0, y0, x1, y1 = (v * s for v in box)
    vertical = (y1 - y0) > (x1 - x0)
    spacing = max(y1 - y0, x1 - x0) / scene.count
    # Shapes must stay apart so that their count is visible: radius well under half the spacing.
    r = min(s * 0.13 * rng.uniform(0.85, 1.1), 0.36 * spacing)
    for k in range(scene.count):
        frac = (k + 0.5) / scene.count
        cx = (x0 + x1) / 2 if vertical else x0 + frac * (x1 - x0)
        cy = y0 + frac * (y1 - y0) if vertical else (y0 + y1) / 2
        cx += rng.uniform(-0.03, 0.03) * s
        cy += rng.uniform(-0.03, 0.03) * s
        _shape(d, scene.shape, cx, cy, r, COLOURS[scene.colour])
    return img.resize((size, size), Image.LANCZOS)


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:  # diamond
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; the images are tiny
    return buf.getvalue()


OTHER_SENTENCES = (
    ("the", ["cat", "dog", "bird", "child", "teacher", "farmer"], ["sees", "likes", "finds", "draws", "holds"],
     ["a ball", "the door", "a red apple", "two books", "the green hat", "a small box"]),
)


def other_sentence(rng: random.Random) -> str:
    det, subjects, verbs, objects = OTHER_SENTENCES[0]
    tail = rng.choice(["", " in the morning", " at home", " near the river", " every day"])
    return f"{det} {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{tail}"


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 1000) -> Path:
    """Byte-level BPE with RoBERTa's special tokens, saved for transformers' AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_max_length=512)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def build_demo_data(out_dir: str | Path, *, image_size: int = 32, num_pairs: int = 4000, num_images: int = 1000,
                    num_text: int = 4000, num_eval_pairs: int = 200, vocab_size: int = 1000, seed: int = 0,
                    weights: dict[str, float] | None = None, shaded: bool = True,
                    distinct_eval: bool = True) -> DemoData:
    """Build the demo world under ``out_dir`` (seconds); returns its paths.

    ``shaded``: backgrounds shaded by position (False: one light colour, the world before the
    shading). ``distinct_eval``: held-out scenes of distinct content (:func:`held_out_scenes`;
    False: drawn at random like the training scenes, so some share their content). The held-out
    pairs are new drawings and captions; their contents also occur in the training pairs."""
    root = Path(out_dir)
    rng = random.Random(seed)
    weights = weights or {"demo_pairs": 0.5, "demo_images": 0.2, "demo_text": 0.3}

    def pair_records(scenes):
        for scene in scenes:
            yield {"png": png_bytes(draw(scene, image_size, rng, shaded)), "txt": caption(scene, rng)}

    manifests = {
        "demo_pairs": write_corpus(pair_records(random_scene(rng) for _ in range(num_pairs)),
                                   out_dir=root / "pairs", name="demo_pairs", modality="pair", maxcount=1000,
                                   source="procedural").manifest_path,
        "demo_images": write_corpus(({"png": png_bytes(draw(random_scene(rng), image_size, rng, shaded))}
                                     for _ in range(num_images)), out_dir=root / "images", name="demo_images",
                                    modality="image", maxcount=1000, source="procedural").manifest_path,
    }
    texts = [caption(random_scene(rng), rng) if rng.random() < 0.5 else other_sentence(rng) for _ in range(num_text)]
    manifests["demo_text"] = write_corpus(({"txt": t} for t in texts), out_dir=root / "text", name="demo_text",
                                          modality="text", maxcount=2000, source="procedural").manifest_path
    eval_scenes = (held_out_scenes(num_eval_pairs, rng) if distinct_eval
                   else [random_scene(rng) for _ in range(num_eval_pairs)])
    eval_manifest = write_corpus(pair_records(eval_scenes), out_dir=root / "eval", name="demo_eval",
                                 modality="pair", source="procedural, held out").manifest_path
    # The tokenizer sees every caption phrasing and the other sentences (texts + one caption per scene kind).
    vocab_texts = texts + [caption(Scene(s, c, p, n), rng) for s in SHAPES for c in COLOURS
                           for p in POSITIONS for n in (1, 2, 3)] * 2
    tokenizer_dir = train_tokenizer(vocab_texts, root / "tokenizer", vocab_size)
    spec = root / "blend.yaml"
    spec.write_text(yaml.safe_dump({"corpora": [
        {"name": name, "modality": {"demo_pairs": "pair", "demo_images": "image", "demo_text": "text"}[name],
         "manifest": str(path.relative_to(root)), "weight": weights[name]} for name, path in manifests.items()]},
        sort_keys=False))
    info = DemoData(root=root, spec=spec, tokenizer_dir=tokenizer_dir, eval_manifest=eval_manifest, manifests=manifests)
    (root / "demo.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else {n: str(p) for n, p in v.items()}
                                                for k, v in vars(info).items()}, indent=1))
    return info
