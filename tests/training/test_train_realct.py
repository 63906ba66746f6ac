"""Real CT on both sides of the classifier: PNG stacks split by patient, balanced batches,
sharpness augmentation, lesion transplant, and the real-CT figure of the validation."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_model import load_checkpoint
from mtl_model.preprocessing import LUNG_WINDOW
from training.augment import augment_batch, gaussian_blur, transplant_lesions
from training.config import AugmentConfig, ConfigError, parse_config
from training.data import (
    SLICE_SPACING_MM,
    DataError,
    cut_to_lung_box,
    load_png_stacks,
    load_spec,
)
from training.trainer import BalancedBatchSampler, batch_shares, fit


def test_png_stacks_load_whole_patients(mini_data: Path) -> None:
    s = load_png_stacks(mini_data / "luna16-3", "train", 64, False, ["patient_1", "patient_3"])
    assert len(s) == 16 and s.images.shape == (16, 1, 64, 64)
    assert {n.split("/")[0] for n in s.names} == {"patient_1", "patient_3"}
    assert s.names[:2] == ["patient_1/z_080.png", "patient_1/z_082.png"]  # slice order
    assert not s.has_mask.any() and s.has_label.all() and (s.labels == 0).all()
    # without names, the fixed split runs over patients, never over slices
    val = load_png_stacks(mini_data / "luna16-3", "val", 64, False, val_every=3, val_offset=2)
    assert {n.split("/")[0] for n in val.names} == {"patient_3"}
    with pytest.raises(DataError, match=r"no case\(s\) \['patient_9'\]; it has \['patient_1'"):
        load_png_stacks(mini_data / "luna16-3", "train", 64, False, ["patient_9"])


def test_stacks_are_cut_to_their_lung_box() -> None:
    yy, xx = np.mgrid[:200, :200]
    hu = np.full((200, 200), -1000.0)
    hu[((yy - 100) / 80) ** 2 + ((xx - 100) / 90) ** 2 <= 1] = 40.0  # body
    lungs = np.zeros((200, 200), bool)
    for cx in (65, 135):
        lungs |= ((yy - 100) / 50) ** 2 + ((xx - cx) / 25) ** 2 <= 1
    hu[lungs] = -850.0
    hu[185:195, 20:180] = 400.0  # a table under the patient
    grey = np.clip((hu - LUNG_WINDOW.low) / LUNG_WINDOW.width * 255, 0, 255).round()
    stack = [grey.astype(np.uint8)] * 3
    mask = np.zeros((200, 200), bool)
    mask[95:105, 60:70] = True
    cut, cut_masks = cut_to_lung_box(stack, [mask] * 3, SLICE_SPACING_MM)
    assert cut_masks is not None and len(cut) == 3
    side = cut[0].shape[0]
    assert cut[0].shape == (side, side) == (141, 141)  # both lungs, 121 px wide, + 2 x 10
    assert int(cut_masks[0].sum()) == 100  # the mask moves with the image
    assert (stack[0] == 255).sum() == 1600 and not (cut[0] == 255).any()  # the table is gone
    air = round((-1000 - LUNG_WINDOW.low) / LUNG_WINDOW.width * 255)
    assert abs(int(cut[0][0, 0]) - air) <= 1
    flat = [np.full((50, 50), 200, np.uint8)]  # no lung: stays whole
    assert cut_to_lung_box(flat)[0][0].shape == (50, 50)


def test_real_ct_dataset_specs_are_checked(mini_data: Path) -> None:
    base = {"name": "x", "data": {"train": []}}
    with pytest.raises(ConfigError, match="png_stack needs covid_label"):
        parse_config({**base, "data": {"train": [{"kind": "png_stack", "path": "luna16-3"}]}})
    with pytest.raises(ConfigError, match="cases applies to kinds dicom_seg and png_stack"):
        parse_config(
            {**base, "data": {"train": [{"kind": "covid_ct", "path": "c", "cases": ["a"]}]}}
        )
    with pytest.raises(ConfigError, match="classifier_input 'lung_box' trains architecture"):
        parse_config({**base, "model": {"classifier_input": "lung_box"}})
    with pytest.raises(ConfigError, match="blur_sigma must be"):
        parse_config({**base, "augment": {"blur_sigma": [2.0, 1.0]}})
    cfg = parse_config(
        {
            **base,
            "data": {
                "train": [
                    {"kind": "medseg_png", "path": "medseg-100", "split": "val"},
                    {
                        "kind": "png_stack",
                        "path": "luna16-3",
                        "cases": ["patient_2"],
                        "covid_label": False,
                    },
                ]
            },
        }
    )
    medseg, luna = (load_spec(s, mini_data, 64) for s in cfg.data.train)
    assert medseg.has_label.all() and (medseg.labels == 1).all()  # MedSeg's label is used
    assert luna.summary()["non_covid"] == 8
    boxed = load_spec(cfg.data.train[1], mini_data, 64, cut=True)
    assert boxed.images.shape == luna.images.shape and not torch.equal(boxed.images, luna.images)
    seg = {"kind": "dicom_seg", "path": "luna16-3"}
    spec = parse_config({**base, "data": {"train": [seg]}}).data.train[0]
    with pytest.raises(DataError, match="not implemented for dicom_seg"):
        load_spec(spec, mini_data, 64, cut=True)


def test_balanced_batches_hold_every_source_in_proportion() -> None:
    assert batch_shares([2, 1, 1], 16) == [8, 4, 4]
    assert batch_shares([1, 1, 1], 8) == [3, 3, 2]
    sizes, weights = [100, 7, 30], [2.0, 1.0, 1.0]
    sampler = BalancedBatchSampler(sizes, weights, 16, steps_per_epoch=10, seed=5)
    sampler.set_epoch(1)
    first = list(sampler)
    assert len(first) == len(sampler) == 160
    starts = [0, 100, 107]

    def source(i: int) -> int:
        return max(k for k, s in enumerate(starts) if i >= s)

    for b in range(10):
        counts = Counter(source(i) for i in first[16 * b : 16 * (b + 1)])
        assert counts == {0: 8, 1: 4, 2: 4}
    small = [i - 100 for i in first if source(i) == 1]  # 40 draws from 7 slices
    for cycle in range(5):  # each pass over the small set uses every slice once
        assert sorted(small[7 * cycle : 7 * cycle + 7]) == list(range(7))
    sampler.set_epoch(1)
    assert list(sampler) == first  # the same epoch repeats exactly (resume)
    sampler.set_epoch(2)
    assert list(sampler) != first
    ranks = [
        BalancedBatchSampler(sizes, weights, 16, 10, seed=5, rank=r, world_size=2) for r in (0, 1)
    ]
    for r in ranks:
        r.set_epoch(1)
    a, b = (list(r) for r in ranks)
    assert len(a) == len(b) == 160 and a != b
    with pytest.raises(ValueError, match="leave a source out"):
        BalancedBatchSampler([10, 10], [100.0, 1.0], 8, 5)


def test_sharpness_augmentation() -> None:
    x = torch.zeros(3, 1, 21, 21)
    x[:, :, 10, 10] = 1.0
    y = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), torch.ones(3))
    assert y[0, 0, 10, 10] == pytest.approx(1.0)  # sigma 0 leaves the image
    assert y[1, 0, 10, 10] == pytest.approx(1 / (2 * math.pi), rel=0.02)
    assert y[2, 0, 10, 10] == pytest.approx(1 / (8 * math.pi), rel=0.02)

    g = torch.Generator().manual_seed(0)
    img = torch.rand(8, 1, 32, 32) * 0.5 + 0.25
    mask = torch.zeros_like(img)
    off = {"hflip": 0.0, "rotate_deg": 0.0, "scale": (1.0, 1.0), "translate": 0.0}
    off |= {"window_jitter": 0.0, "gamma": (1.0, 1.0), "noise_std": 0.0}

    def roughness(t: torch.Tensor) -> float:
        return float((t[..., 1:] - t[..., :-1]).abs().mean())

    blurred, _ = augment_batch(
        img, mask, AugmentConfig(**off, blur_prob=1.0, blur_sigma=(1.5, 2.0)), g
    )
    sharpened, _ = augment_batch(
        img,
        mask,
        AugmentConfig(**off, blur_prob=0.0, sharpen_prob=1.0, sharpen_amount=(1.0, 1.0)),
        g,
    )
    assert roughness(blurred) < 0.5 * roughness(img) < roughness(sharpened) * 0.5
    assert float(sharpened.min()) >= 0.0 and float(sharpened.max()) <= 1.0


def _transplant_batch() -> dict[str, torch.Tensor]:
    """Two MedSeg-like donors with a 10 x 10 lesion (symmetric about the vertical axis, so
    mirroring keeps it in place), two lung-like recipients, one recipient of soft tissue
    only, and one lung-like slice that is not a recipient."""
    n = 6
    image = torch.full((n, 1, 32, 32), 0.3)
    mask = torch.zeros(n, 1, 32, 32)
    image[0:2, :, 11:21, 11:21] = 0.8
    mask[0:2, :, 11:21, 11:21] = 1.0
    image[4] = 0.9  # no lung anywhere
    return {
        "image": image,
        "mask": mask,
        "has_mask": torch.tensor([True, True, False, False, False, False]),
        "label": torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
        "has_label": torch.ones(n, dtype=torch.bool),
        "recipient": torch.tensor([False, False, True, True, True, False]),
    }


def test_lesion_transplant_makes_real_non_covid_slices_covid_samples() -> None:
    batch = _transplant_batch()
    cfg = AugmentConfig(lesion_transplant=1.0, lesion_strength=(1.0, 1.0))
    out = transplant_lesions(batch, cfg, torch.Generator().manual_seed(0))
    assert out["label"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert out["has_label"].all()
    assert torch.equal(out["has_mask"], batch["has_mask"])  # the lesion's outline stays unknown
    for i in (2, 3):  # the lesion's core takes the donor's density; far away nothing changes
        assert float(out["image"][i, 0, 16, 16]) == pytest.approx(0.8, abs=0.02)
        assert float(out["image"][i, 0, 16, 11]) > 0.4  # softened edge, still raised
        assert torch.equal(out["image"][i, :, :, :4], batch["image"][i, :, :, :4])
    for i in (0, 1, 4, 5):  # donors, a recipient without lung, a non-recipient
        assert torch.equal(out["image"][i], batch["image"][i])
    assert batch["label"][2] == 0.0  # the caller's batch is left as it was

    weak = AugmentConfig(lesion_transplant=1.0, lesion_strength=(0.4, 0.4))
    faint = transplant_lesions(batch, weak, torch.Generator().manual_seed(0))
    assert float(faint["image"][2, 0, 16, 16]) == pytest.approx(0.3 + 0.4 * 0.5, abs=0.02)

    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    for off in (AugmentConfig(), AugmentConfig(lesion_transplant=1.0, enabled=False)):
        assert transplant_lesions(batch, off, g) is batch
    no_donor = {**batch, "has_mask": torch.zeros(6, dtype=torch.bool)}
    assert transplant_lesions(no_donor, cfg, g) is no_donor
    assert torch.equal(g.get_state(), state)  # a run without transplant draws nothing


def test_lesion_recipients_are_real_non_covid_stacks(mini_data: Path) -> None:
    base = {"name": "x", "data": {"train": []}}
    luna = {"kind": "png_stack", "path": "luna16-3", "cases": ["patient_2"]}
    for bad in (
        {"kind": "medseg_png", "path": "medseg-100", "lesion_recipient": True},
        {**luna, "covid_label": True, "lesion_recipient": True},
    ):
        with pytest.raises(ConfigError, match="lesion_recipient applies to png_stack"):
            parse_config({**base, "data": {"train": [bad]}})
    with pytest.raises(ConfigError, match="lesion_strength must be"):
        parse_config({**base, "augment": {"lesion_strength": [0.9, 0.5]}})
    spec = {**luna, "covid_label": False, "lesion_recipient": True}
    cfg = parse_config({**base, "data": {"train": [spec, {**spec, "lesion_recipient": False}]}})
    marked, plain = (load_spec(s, mini_data, 64) for s in cfg.data.train)
    assert marked.recipient.all() and not plain.recipient.any()


@pytest.mark.slow
def test_fit_with_balanced_real_ct_reports_the_real_ct_figure(
    mini_data: Path, tmp_path: Path, tiny_config
) -> None:
    luna = {"kind": "png_stack", "path": "luna16-3", "covid_label": False}
    recipients = {**luna, "lesion_recipient": True}
    cfg = tiny_config(
        model={
            "architecture": "cnn8",
            "base_width": 4,
            "input_size": 64,
            "tasks": ["classification"],
            "classifier_input": "lung_box",
        },
        data={
            "train": [
                {"kind": "covid_ct", "path": "covid-ct", "split": "train", "weight": 2.0},
                {"kind": "medseg_png", "path": "medseg-100", "split": "train"},
                {**recipients, "cases": ["patient_1", "patient_2"]},
            ],
            "val": [
                {"kind": "covid_ct", "path": "covid-ct", "split": "val"},
                {"kind": "medseg_png", "path": "medseg-100", "split": "val"},
                {**luna, "cases": ["patient_3"]},
            ],
        },
        train={"epochs": 2, "batch_size": 8, "sampling": "balanced", "max_steps_per_epoch": 3},
        augment={"blur_sigma": [0.5, 1.5], "sharpen_prob": 0.3, "lesion_transplant": 0.5},
    )
    res = fit(cfg, tmp_path / "run", mini_data, progress=False)
    assert res.epochs_run == 2
    m = res.best_metrics
    assert 0.0 <= m["real_auc"] <= 1.0  # MedSeg val (COVID) against LUNA16 patient 3
    assert 0.0 <= m["auc"] <= 1.0  # UCSD val alone, as before
    assert m["score"] == pytest.approx((m["auc"] + m["real_auc"]) / 2)
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert not any(n.startswith("patient_3/") for n in data["train_names"])
    assert [s["source"] for s in data["summary"]["train"]][2] == "png_stack:patient_1,patient_2"
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "val_real_auc" in rows[0]
    _model, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta.preprocessing.classifier_input == "lung_box"


@pytest.mark.slow
def test_pack_cut_gives_the_slices_a_lung_box_run_cuts_at_load(
    mini_data: Path, tmp_path: Path
) -> None:
    """`scripts/pack_data.py --cut` (the data a GPU run carries) holds the very uint8 slices
    that cutting at load gives, and only a lung-box run reads them."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    pack = tmp_path / "pack"
    args = ["--data", str(mini_data), "--out", str(pack), "--size", "64", "--cut"]
    done = subprocess.run(
        [sys.executable, "scripts/pack_data.py", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    specs = [
        ({"kind": "medseg_png", "path": "medseg-100"}, "medseg-100-box"),
        ({"kind": "png_stack", "path": "luna16-3", "covid_label": False}, "luna16-3-box"),
    ]
    for raw, box in specs:
        cfg = parse_config({"name": "x", "data": {"train": [raw, {**raw, "path": box}]}})
        source, packed = cfg.data.train
        at_load = load_spec(source, mini_data, 64, cut=True)
        from_pack = load_spec(packed, pack, 64, cut=True)
        assert from_pack.names == at_load.names
        assert torch.equal(from_pack.images, at_load.images)
        assert torch.equal(from_pack.masks, at_load.masks)
        assert not torch.equal(from_pack.images, load_spec(source, mini_data, 64).images)
        with pytest.raises(DataError, match="only a lung-box classifier"):
            load_spec(packed, pack, 64, cut=False)
