"""The multi-task network of Amyar, Modzelewski & Ruan (2020) and the paper's two baselines.

Choices where the paper is silent or ambiguous (Keras text, no code):

* Encoder: 5 levels of two 3x3 convolutions each (the paper's "10 conv layers"), feature
  maps ``w, 2w, 4w, 8w, 16w`` with ``w = base_width`` (64 -> 1024 for the paper's width),
  2x2 max-pooling between levels (4 poolings). With a 256x256 input the encoder output is
  16x16x1024; the paper's "32x32x1024" matches its 512x512 experiment, and 4 poolings is
  the standard U-Net that the paper says it follows, so we keep 4 poolings.
* Normalisation: BatchNorm after every convolution (then ReLU). The paper does not name a
  normalisation layer; BatchNorm makes from-scratch training on ~600 images markedly more
  stable and folds into the convolution at inference, so it costs nothing in the node.
* Decoders (reconstruction T1, segmentation T2): the U-Net expanding path, 2x2 transposed
  convolutions, concatenation with the encoder skip, two 3x3 convolutions per level, a
  final 1x1 convolution to one channel. T1 is linear (loss MSE); T2 returns logits, and the
  sigmoid the paper puts at its end is applied by the loss and by the predictor (numerically
  safer, and bf16-friendly).
* Classifier (T3): on the encoder output a 3x3 convolution with ``2w`` channels (ReLU) and a
  2x2 max-pool, flatten, Dense 128 -> Dense 64 with ELU and dropout 0.5, Dense 1. Like the
  paper's sigmoid output, it is returned as a logit. Flattening ties the classifier to the
  input size, which is therefore an architecture argument. ``classifier_pooling =
  "global_average"`` replaces the 2x2 max-pool + flatten by global average pooling (``2w``
  inputs to Dense 128 instead of ``2w * 8 * 8`` at 256x256), as the CNN8 baseline pools: on
  ~400 labelled images the flattened head overfits (docs/experiments.md). The paper's
  head stays the default.
* ``classifier_pooling = "image_cnn8"`` makes T3 the 8-layer CNN below (width
  ``classifier_width``), run on the input slice with weights of its own instead of on the
  shared encoder, so that it can see another input (the lung box) and be retrained on a
  CPU while the encoder and the lesion decoder stay as they are. The 0.3.0 encoder had
  learned "smooth image = COVID-19" (a blur of 1.5 px of the network grid moved a normal
  LUNA16 patient from 0.22 to 0.92), and a head retrained on its frozen features did not
  unlearn it (docs/experiments.md, seventh session).
* ``classifier_members`` > 1 makes that T3 several 8-layer CNNs of the same width trained
  with different seeds, and ``classifier_flip`` adds each slice's left-right mirror; the
  logits are averaged. One CNN8 trained on ~700 slices varies by about 0.04 UCSD val AUC
  from seed to seed and by more on real series (RICORD 0.16 to 0.62 at the same recipe),
  so one member's figure is partly luck; the average is steadier and scores higher
  (docs/experiments.md, tenth session). The mirror costs nothing to train: every
  member saw flipped slices (augmentation ``hflip``).
* The reconstruction decoder is only built when the ``reconstruction`` task is requested:
  an inference model has encoder + segmentation + classification.
* CNN8 (the paper's Experiment 3 baseline, "a CNN with 8 layers"): six 3x3 convolutions in
  three blocks (``w, w, 2w, 2w, 4w, 4w``, BatchNorm + ReLU, max-pool after each block), global
  average pooling, Dense 128 (ELU, dropout 0.5), Dense 1: eight weighted layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from torch import nn

TASKS: tuple[str, ...] = ("reconstruction", "segmentation", "classification")
ARCHITECTURES: tuple[str, ...] = ("mtl", "unet", "cnn8")
ClassifierPooling = Literal["max2x2_flatten", "global_average", "image_cnn8"]
CLASSIFIER_POOLINGS: tuple[str, ...] = get_args(ClassifierPooling)
PAPER_POOLING: ClassifierPooling = "max2x2_flatten"


def canonical_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    """Validate a task list and put it in the canonical order (T1, T2, T3)."""
    given = list(tasks)
    unknown = [t for t in given if t not in TASKS]
    if unknown or not given:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {given}")
    return tuple(t for t in TASKS if t in given)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """Shared U-Net contracting path; returns the skips and the bottleneck."""

    def __init__(self, in_channels: int, base_width: int, levels: int = 5) -> None:
        super().__init__()
        widths = [base_width * 2**i for i in range(levels)]
        self.widths = widths
        self.blocks = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.blocks.append(_double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        return skips[:-1], x


class Decoder(nn.Module):
    """U-Net expanding path ending in a 1-channel 1x1 convolution (no activation)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
            self.blocks.append(_double_conv(2 * widths[i - 1], widths[i - 1]))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, skips: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        out: torch.Tensor = self.head(x)
        return out


class Classifier(nn.Module):
    """T3: conv + pooling + flatten + Dense 128 + Dense 64 (ELU, dropout 0.5) + Dense 1."""

    def __init__(
        self,
        in_channels: int,
        base_width: int,
        bottleneck_size: int,
        pooling: str = PAPER_POOLING,
    ) -> None:
        super().__init__()
        if bottleneck_size < 2:
            raise ValueError("input_size too small for the classifier (needs >= 32)")
        if pooling not in CLASSIFIER_POOLINGS or pooling == "image_cnn8":
            raise ValueError(
                f"unknown classifier_pooling {pooling!r}; known: {list(CLASSIFIER_POOLINGS)}"
            )
        conv_channels = 2 * base_width
        pool: nn.Module
        if pooling == PAPER_POOLING:
            pool = nn.MaxPool2d(2)
            flat = conv_channels * (bottleneck_size // 2) ** 2
        else:
            pool = nn.AdaptiveAvgPool2d(1)
            flat = conv_channels
        # The pooling layers hold no weights: both heads share the state-dict names.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            pool,
            nn.Flatten(),
        )
        self.mlp = nn.Sequential(
            nn.Linear(flat, 128),
            nn.ELU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(128, 64),
            nn.ELU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(64, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.features(x)).squeeze(1)
        return out


class MTLNet(nn.Module):
    """Shared encoder with any subset of the three task heads (T1, T2, T3)."""

    def __init__(
        self,
        base_width: int = 64,
        input_size: int = 256,
        in_channels: int = 1,
        tasks: Iterable[str] = TASKS,
        classifier_pooling: str = PAPER_POOLING,
        classifier_width: int | None = None,
        classifier_members: int = 1,
        classifier_flip: bool = False,
    ) -> None:
        super().__init__()
        task_set = canonical_tasks(tasks)
        image_cnn8_only = {
            "classifier_width": classifier_width is not None,
            "classifier_members": classifier_members != 1,
            "classifier_flip": classifier_flip,
        }
        for name, given in image_cnn8_only.items():
            if given and classifier_pooling != "image_cnn8":
                raise ValueError(f"{name} applies to classifier_pooling 'image_cnn8' only")
        if classifier_members < 1:
            raise ValueError(f"classifier_members must be >= 1, got {classifier_members}")
        if input_size % 32 != 0:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.base_width = base_width
        self.input_size = input_size
        self.in_channels = in_channels
        self.tasks = task_set
        self.classifier_pooling = classifier_pooling
        self.classifier_width = classifier_width
        self.classifier_members = classifier_members
        self.classifier_flip = classifier_flip
        self.encoder = Encoder(in_channels, base_width)
        widths = self.encoder.widths
        self.reconstruction = Decoder(widths) if "reconstruction" in task_set else None
        self.segmentation = Decoder(widths) if "segmentation" in task_set else None
        self.classification: nn.Module | None = None
        self.classifier_on_image = classifier_pooling == "image_cnn8"
        if "classification" in task_set:
            if self.classifier_on_image:
                width = classifier_width or base_width
                if classifier_members == 1 and not classifier_flip:
                    self.classification = CNN8(width, input_size, in_channels)
                else:
                    self.classification = CNN8Ensemble(
                        classifier_members, width, input_size, in_channels, classifier_flip
                    )
            else:
                self.classification = Classifier(
                    widths[-1], base_width, input_size // 16, classifier_pooling
                )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skips, bottleneck = self.encoder(x)
        out: dict[str, torch.Tensor] = {}
        if self.reconstruction is not None:
            out["reconstruction"] = self.reconstruction(skips, bottleneck)
        if self.segmentation is not None:
            out["segmentation"] = self.segmentation(skips, bottleneck)
        if self.classification is not None:
            if self.classifier_on_image:
                out["classification"] = self.classification(x)["classification"]
            else:
                out["classification"] = self.classification(bottleneck)
        return out


class UNet(MTLNet):
    """The paper's U-Net baseline: the same encoder and segmentation decoder, nothing else."""

    def __init__(
        self,
        base_width: int = 64,
        input_size: int = 256,
        in_channels: int = 1,
        tasks: Iterable[str] = ("segmentation",),
    ) -> None:
        if set(tasks) != {"segmentation"}:
            raise ValueError("UNet has the segmentation task only")
        super().__init__(base_width, input_size, in_channels, ("segmentation",))


class CNN8(nn.Module):
    """The paper's 8-layer CNN classifier baseline (Experiment 3)."""

    def __init__(
        self,
        base_width: int = 64,
        input_size: int = 256,
        in_channels: int = 1,
        tasks: Iterable[str] = ("classification",),
    ) -> None:
        super().__init__()
        if set(tasks) != {"classification"}:
            raise ValueError("CNN8 has the classification task only")
        self.base_width = base_width
        self.input_size = input_size
        self.in_channels = in_channels
        self.tasks: tuple[str, ...] = ("classification",)
        layers: list[nn.Module] = []
        cin = in_channels
        for w in (base_width, 2 * base_width, 4 * base_width):
            layers += [_double_conv(cin, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mlp = nn.Sequential(
            nn.Linear(cin, 128), nn.ELU(inplace=True), nn.Dropout(0.5), nn.Linear(128, 1)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"classification": self.mlp(self.features(x)).squeeze(1)}


class CNN8Ensemble(nn.Module):
    """Several CNN8 members (module docstring), optionally also on the mirrored slice; the
    output is the mean logit, so it reads like one CNN8's."""

    def __init__(
        self,
        members: int,
        base_width: int = 64,
        input_size: int = 256,
        in_channels: int = 1,
        flip: bool = False,
    ) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        self.tasks: tuple[str, ...] = ("classification",)
        self.flip = flip
        self.members = nn.ModuleList(
            CNN8(base_width, input_size, in_channels) for _ in range(members)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        views = torch.cat([x, x.flip(-1)]) if self.flip else x
        logits = torch.stack([m(views)["classification"] for m in self.members]).mean(0)
        if self.flip:
            logits = logits.view(2, n).mean(0)
        return {"classification": logits}


_REGISTRY: dict[str, type[nn.Module]] = {"mtl": MTLNet, "unet": UNet, "cnn8": CNN8}


def build_model(
    architecture: str = "mtl",
    base_width: int = 64,
    input_size: int = 256,
    in_channels: int = 1,
    tasks: Iterable[str] | None = None,
    classifier_pooling: str = PAPER_POOLING,
    classifier_width: int | None = None,
    classifier_members: int = 1,
    classifier_flip: bool = False,
) -> nn.Module:
    """Build any of the three networks from the arguments a checkpoint stores."""
    if architecture not in _REGISTRY:
        raise ValueError(f"unknown architecture {architecture!r}; known: {ARCHITECTURES}")
    kwargs: dict[str, Any] = {
        "base_width": base_width,
        "input_size": input_size,
        "in_channels": in_channels,
    }
    if tasks is not None:
        kwargs["tasks"] = tuple(tasks)
    if architecture == "mtl":
        kwargs["classifier_pooling"] = classifier_pooling
        kwargs["classifier_width"] = classifier_width
        kwargs["classifier_members"] = classifier_members
        kwargs["classifier_flip"] = classifier_flip
    elif (
        classifier_pooling != PAPER_POOLING
        or classifier_width is not None
        or classifier_members != 1
        or classifier_flip
    ):
        raise ValueError(
            f"classifier_pooling, classifier_width, classifier_members and classifier_flip "
            f"apply to architecture 'mtl' only, not {architecture!r}"
        )
    return _REGISTRY[architecture](**kwargs)


def model_tasks(model: nn.Module) -> tuple[str, ...]:
    """The task heads a model built here carries."""
    tasks = getattr(model, "tasks", None)
    if not isinstance(tasks, tuple):
        raise TypeError(f"{type(model).__name__} was not built by mtl_model.build_model")
    return tasks
