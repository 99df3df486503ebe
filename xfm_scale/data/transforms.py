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

import numpy as np
import torch
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_transform(size: int, *, scale: tuple[float, float] = (0.2, 1.0),
                    randaug: tuple[int, int] | None = (2, 7)) -> T.Compose:
    """The method's pre-training augmentation: RandomResizedCrop, flip, RandAugment(2, 7), CLIP norm."""
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if randaug is not None:
        steps.append(T.RandAugment(num_ops=randaug[0], magnitude=randaug[1]))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


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
