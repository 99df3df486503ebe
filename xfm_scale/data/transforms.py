"""Image transforms (torchvision) and the per-sample seeding that makes them deterministic.

torchvision's v1 transforms draw from torch's global CPU generator and take no generator argument,
so each sample's augmentation is made deterministic by seeding that generator from
(seed, global sample index) right before the sample, inside ``torch.random.fork_rng(devices=[])``,
which restores the CPU generator afterwards. Only the CPU generator is seeded
(``torch.default_generator.manual_seed``): ``torch.manual_seed`` would also reseed every CUDA
generator, which ``fork_rng(devices=[])`` does not restore, and with ``num_workers=0`` the loader
runs in the trainer's process, so the trainer's CUDA random state (dropout) would change.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_SIZE = 224  # the image size the reference's pixel-valued augmentation levels are for


def train_transform(size: int, *, scale: tuple[float, float] = (0.2, 1.0),
                    randaug: tuple[int, int] | None = (2, 7)) -> T.Compose:
    """The method's pre-training augmentation: RandomResizedCrop, flip, RandAugment(2, 7) in the
    reference's form (:class:`CaptionSafeRandAugment`), CLIP norm."""
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if randaug is not None:
        steps.append(CaptionSafeRandAugment(num_ops=randaug[0], level=randaug[1]))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


class CaptionSafeRandAugment(torch.nn.Module):
    """RandAugment(N, M) as the X-FM reference applies it (ALBEF's ``RandomAugment``, which X-VLM
    and X-FM inherit), not torchvision's ``T.RandAugment(2, 7)``, which differs in three ways:

    * the ops: ten that keep an image's colours. Captions name colours ("a red car"), so the
      reference leaves out Color, Contrast, Posterize and Solarize, which torchvision draws
      (Solarize turns a bright red patch dark);
    * each drawn op is applied with probability 0.5 (torchvision: always);
    * the level is M of 10 (torchvision's magnitude 7 is 7 of 30 bins): rotate +-3M degrees,
      shear +-0.03M, translate +-M pixels at 224 (the same fraction of other sizes), brightness and
      sharpness by the factor 0.18M + 0.1.

    Randomness comes from torch's CPU generator, which the loader seeds per sample.
    """

    OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
           "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    FILL = [128, 128, 128]  # the reference's grey for pixels moved in from outside

    def __init__(self, num_ops: int = 2, level: int = 7, max_level: int = 10, translate_px: float = 10.0):
        super().__init__()
        self.num_ops, self.fraction, self.translate_px = num_ops, level / max_level, translate_px

    def forward(self, img):
        for _ in range(self.num_ops):
            name = self.OPS[int(torch.randint(len(self.OPS), ()))]
            if float(torch.rand(())) < 0.5:
                img = self._apply(name, img)
        return img

    def _signed(self, value: float) -> float:
        return -value if float(torch.rand(())) < 0.5 else value

    def _apply(self, name: str, img):
        f = self.fraction
        affine = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                      interpolation=T.InterpolationMode.BILINEAR, fill=self.FILL)
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return TF.autocontrast(img)
        if name == "Equalize":
            return TF.equalize(img)
        if name == "Brightness":
            return TF.adjust_brightness(img, f * 1.8 + 0.1)
        if name == "Sharpness":
            return TF.adjust_sharpness(img, f * 1.8 + 0.1)
        if name in ("ShearX", "ShearY"):  # a shear factor s is an angle of atan(s)
            angle = math.degrees(math.atan(self._signed(f * 0.3)))
            return TF.affine(img, **{**affine, "shear": [angle, 0.0] if name == "ShearX" else [0.0, angle]})
        if name in ("TranslateX", "TranslateY"):
            # the reference's pixels are at 224: other sizes move by the same fraction of the image
            _, height, width = TF.get_dimensions(img)
            extent = width if name == "TranslateX" else height
            shift = round(self._signed(f * self.translate_px * extent / REFERENCE_SIZE))
            return TF.affine(img, **{**affine, "translate": [shift, 0] if name == "TranslateX" else [0, shift]})
        return TF.rotate(img, self._signed(f * 30.0), interpolation=T.InterpolationMode.BILINEAR, fill=self.FILL)


def eval_transform(size: int) -> T.Compose:
    """Deterministic: resize the short side, centre-crop, CLIP norm."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def sample_rngs(seed: int, global_index: int) -> tuple[int, np.random.Generator]:
    """(torch seed for the image augmentation, numpy Generator for masks) of one global sample.

    Both derive from (seed, global index) only, never from worker or rank state, so a sample
    is processed identically for any number of workers and any data-parallel size.
    """
    seq = np.random.SeedSequence([seed, global_index])
    torch_seed = int(seq.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)
    return torch_seed, np.random.default_rng(seq.spawn(1)[0])


def apply_seeded(transform, image, torch_seed: int) -> torch.Tensor:
    """Run ``transform`` with torch's global CPU generator seeded (call inside ``fork_rng``).
    The same CPU state as ``torch.manual_seed`` gives, without touching the CUDA generators."""
    torch.default_generator.manual_seed(torch_seed)
    return transform(image)
