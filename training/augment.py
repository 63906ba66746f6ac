"""Batched augmentation on the training device: geometry, intensity and window jitter.

Why each part:

* geometry (flip, rotation, scale, shift; image and mask warped together, the mask
  re-thresholded at 0.5): 600 slices are few, and UCSD figures are cropped and framed
  arbitrarily;
* window jitter (random remap ``(x - a) / (b - a)`` with ``a, b`` near 0 and 1) and gamma:
  UCSD figures come in whatever window their authors chose, and the node feeds HU through
  one fixed lung window, so the network must not depend on one exact grey mapping;
* blur, sharpening and noise: figures are often re-compressed, downscaled JPEGs, while
  DICOM is sharp; and real CT differs by scanner in reconstruction kernel and slice
  thickness. Measured on the 0.3.0 release: a Gaussian blur of 3 px of the 512 source grid
  (1.5 px of the network grid) on a held-out normal LUNA16 patient raised its series
  COVID-19 probability from 0.22 to 0.92 (``scripts/sharpness_probe.py``),
  so sharpness must not tell the classes apart (``blur_sigma``, ``sharpen_prob``);
* lesion transplant (``transplant_lesions``, before the rest): the only real COVID-19 CT
  in training is MedSeg's severe slices and the only real non-COVID CT is LUNA16
  screening, so "MedSeg's scanner" and "COVID-19" coincide, and a mild case such as the
  RICORD series looks like neither. A LUNA16 slice that gets a MedSeg lesion, often a
  faint one, is a COVID-19 sample from the other scanner. Off by default: in a
  pre-registered A/B at width 16 it kept UCSD val AUC but gave the lung-cancer series more
  than RICORD in both seeds (docs/experiments.md, "lesion transplant").

All random draws come from the ``torch.Generator`` passed in, so a resumed run repeats the
same augmentation for the same epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each of (N, 1, H, W) with its own Gaussian ``sigma`` (N,) in pixels (0 = none)."""
    n = x.shape[0]
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.float().clamp_min(1e-3).view(n, 1)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2.0 * s**2))
    k = (k / k.sum(dim=1, keepdim=True)).to(x.device, x.dtype)
    # one group per image: (1, N, H, W) convolved with N separable kernels
    y = F.pad(x.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(y, k.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (N, 1, H, W) images in [0, 1] and their (N, 1, H, W) 0/1 masks."""
    if not cfg.enabled:
        return images, masks
    n = images.shape[0]
    dev = images.device
    g = generator
    # geometry: inverse affine map output -> input in normalised coordinates
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g) * math.pi / 180.0
    scale = torch.exp(_uniform(n, math.log(cfg.scale[0]), math.log(cfg.scale[1]), g))
    flip = torch.where(torch.rand(n, generator=g) < cfg.hflip, -1.0, 1.0)
    tx = _uniform(n, -cfg.translate, cfg.translate, g) * 2.0
    ty = _uniform(n, -cfg.translate, cfg.translate, g) * 2.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, tx], dim=1),
            torch.stack([sin * flip, cos, ty], dim=1),
        ],
        dim=1,
    ).to(dev, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.grid_sample(
        masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    m = (m >= 0.5).to(masks.dtype)
    # window jitter
    j = cfg.window_jitter
    if j > 0:
        a = _uniform(n, -j, j, g).to(dev).view(n, 1, 1, 1)
        b = (1.0 + _uniform(n, -j, j, g)).to(dev).view(n, 1, 1, 1)
        x = ((x - a) / (b - a)).clamp(0.0, 1.0)
    # gamma
    lo, hi = cfg.gamma
    if (lo, hi) != (1.0, 1.0):
        gam = torch.exp(_uniform(n, math.log(lo), math.log(hi), g)).to(dev).view(n, 1, 1, 1)
        x = x.clamp_min(1e-6).pow(gam)
    # blur on a random subset: the fixed 3x3 Gaussian (sigma ~0.8), or a random sigma
    if cfg.blur_prob > 0:
        if cfg.blur_sigma[1] > 0:
            sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], g)
            blurred = gaussian_blur(x, sigma)
        else:
            k1 = torch.tensor([0.27, 0.46, 0.27], device=dev, dtype=x.dtype)
            kernel = (k1[:, None] * k1[None, :]).view(1, 1, 3, 3)
            blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
        sel = (torch.rand(n, generator=g) < cfg.blur_prob).to(dev).view(n, 1, 1, 1)
        x = torch.where(sel, blurred, x)
    # sharpening (unsharp mask, sigma 1 px) on a random subset
    if cfg.sharpen_prob > 0:
        amount = _uniform(n, cfg.sharpen_amount[0], cfg.sharpen_amount[1], g)
        amount = amount.to(dev, x.dtype).view(n, 1, 1, 1)
        sharp = x + amount * (x - gaussian_blur(x, torch.ones(n)))
        sel = (torch.rand(n, generator=g) < cfg.sharpen_prob).to(dev).view(n, 1, 1, 1)
        x = torch.where(sel, sharp, x)
    # noise
    if cfg.noise_std > 0:
        std = _uniform(n, 0.0, cfg.noise_std, g).to(dev).view(n, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g).to(dev)
        x = x + std * noise
    return x.clamp(0.0, 1.0), m


#: a donor needs this many lesion pixels on the grid; a recipient pixel counts as lung
#: where its surroundings are darker than LUNG_LIKE (about -680 HU in the lung window)
MIN_LESION_PIXELS = 40
LUNG_LIKE = 0.45


def transplant_lesions(
    batch: dict[str, torch.Tensor], cfg: AugmentConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Give ``cfg.lesion_transplant`` of the batch's recipient slices a donor's lesion.

    A donor is a slice of the same batch with a lesion mask (MedSeg), mirrored at random.
    Its mask, softened by a Gaussian of 1.5 px so that no edge marks the transplant, is
    scaled by a strength from ``cfg.lesion_strength`` and raises the recipient's lung
    pixels towards the donor's brighter values (lesions are denser than lung; vessels and
    soft tissue of the recipient stay as they are). A recipient where at least
    ``MIN_LESION_PIXELS`` of the lesion fall on its lung then counts as COVID-19 (the
    others stay as they were). Its lesion mask stays unknown (``has_mask`` unchanged):
    only the classifier learns from it. Returns a new dict; without recipients or donors,
    the batch as it was.
    """
    share = cfg.lesion_transplant if cfg.enabled else 0.0
    if share <= 0 or "recipient" not in batch:
        return batch
    images, masks = batch["image"], batch["mask"]
    dev = images.device
    g = generator
    lesion_px = masks.flatten(1).sum(1).cpu()
    donors = torch.nonzero(batch["has_mask"].cpu() & (lesion_px >= MIN_LESION_PIXELS)).flatten()
    recipients = torch.nonzero(batch["recipient"].cpu()).flatten()
    if len(donors) == 0 or len(recipients) == 0:
        return batch
    take = recipients[torch.rand(len(recipients), generator=g) < share]
    k = len(take)
    if k == 0:
        return batch
    pick = donors[torch.randint(len(donors), (k,), generator=g)]
    mirror = (torch.rand(k, generator=g) < 0.5).to(dev).view(k, 1, 1, 1)
    donor = images[pick.to(dev)]
    lesion = masks[pick.to(dev)].to(images.dtype)
    donor = torch.where(mirror, donor.flip(-1), donor)
    lesion = torch.where(mirror, lesion.flip(-1), lesion)
    soft = gaussian_blur(lesion, torch.full((k,), 1.5))
    strength = _uniform(k, cfg.lesion_strength[0], cfg.lesion_strength[1], g)
    target = images[take.to(dev)]
    lung = (gaussian_blur(target, torch.full((k,), 2.0)) < LUNG_LIKE).to(images.dtype)
    gain = soft * strength.to(dev, images.dtype).view(k, 1, 1, 1) * lung
    # a lesion that lands outside the recipient's lung (an apical slice's small lungs)
    # leaves it as it was: a COVID-19 label on an unchanged slice would be a wrong label
    landed = (lesion * lung).flatten(1).sum(1).cpu() >= MIN_LESION_PIXELS
    if not bool(landed.any()):
        return batch
    where = take[landed].to(dev)
    mixed = (target + gain * (donor - target).clamp_min(0.0)).clamp(0.0, 1.0)
    out = images.clone()
    out[where] = mixed[landed.to(dev)]
    labels, has_label = batch["label"].clone(), batch["has_label"].clone()
    labels[where] = 1.0
    has_label[where] = True
    return {**batch, "image": out, "label": labels, "has_label": has_label}
