"""The training loop on real images at tiny width: learning, resume, stopping rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mtl_model import build_model, load_checkpoint
from training.augment import augment_batch
from training.config import AugmentConfig, LossConfig
from training.data import concat_slice_sets, load_covid_ct, load_medseg_png
from training.losses import MultiTaskLoss
from training.trainer import _swa_model, fit


@pytest.mark.slow
def test_few_cpu_steps_lower_the_loss_on_real_images(mini_data: Path) -> None:
    s = concat_slice_sets(
        [
            load_covid_ct(mini_data / "covid-ct", "val", 64),
            load_medseg_png(mini_data / "medseg-100", "val", 64),
        ]
    )
    batch = {
        "image": s.images.float() / 255.0,
        "mask": s.masks.float(),
        "has_mask": s.has_mask,
        "label": s.labels,
        "has_label": s.has_label,
    }
    torch.manual_seed(0)
    model = build_model("mtl", base_width=4, input_size=64)
    loss_fn = MultiTaskLoss(LossConfig())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss, _ = loss_fn(model(batch["image"]), batch)
        model.train()
        return float(loss)

    # BatchNorm running statistics need a few batches before eval-mode losses mean much
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(batch["image"])
    before = eval_loss()
    for _ in range(25):
        loss, _ = loss_fn(model(batch["image"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.1, (before, after)


def test_augmentation_keeps_range_and_masks(mini_data: Path) -> None:
    s = load_medseg_png(mini_data / "medseg-100", "val", 64)
    x, m = s.images.float() / 255.0, s.masks.float()
    cfg = AugmentConfig()
    ax, am = augment_batch(x, m, cfg, torch.Generator().manual_seed(1))
    assert ax.shape == x.shape and am.shape == m.shape
    assert float(ax.min()) >= 0.0 and float(ax.max()) <= 1.0
    assert set(torch.unique(am).tolist()) <= {0.0, 1.0}
    assert not torch.equal(ax, x)
    # lesions move with the image but keep roughly their size (scale 0.9-1.1)
    ratio = am.sum() / m.sum()
    assert 0.6 < float(ratio) < 1.5
    bx, _ = augment_batch(x, m, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(ax, bx)  # seeded
    off = AugmentConfig(enabled=False)
    assert augment_batch(x, m, off, torch.Generator())[0] is x


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_resume_continues_where_it_stopped(mini_data: Path, tmp_path: Path, tiny_config) -> None:
    cfg = tiny_config(train={"epochs": 3, "max_steps_per_epoch": 3})
    straight = fit(cfg, tmp_path / "straight", mini_data, progress=False)
    assert straight.epochs_run == 3 and straight.stopped.startswith("all 3 epochs")

    part = fit(cfg, tmp_path / "split", mini_data, progress=False, max_epochs=1)
    assert part.epochs_run == 1 and "resumable" in part.stopped
    assert [r["epoch"] for r in _rows(tmp_path / "split")] == ["1"]
    resumed = fit(cfg, tmp_path / "split", mini_data, progress=False)
    assert [r["epoch"] for r in _rows(tmp_path / "split")] == ["1", "2", "3"]
    assert [r["step"] for r in _rows(tmp_path / "split")] == ["3", "6", "9"]
    assert resumed.best_epoch == straight.best_epoch

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # a finished run resumes to nothing new
    again = fit(cfg, tmp_path / "split", mini_data, progress=False)
    assert again.epochs_run == 3 and len(_rows(tmp_path / "split")) == 3

    # the best checkpoint is an mtl_model checkpoint describing the run
    _model, meta = load_checkpoint(tmp_path / "split" / "best.safetensors")
    assert meta.architecture.base_width == 4 and meta.architecture.input_size == 64
    assert meta.training["experiment"] == "tiny"
    assert meta.training["data"]["train"][0]["slices"] == 12
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["steps"] == 9

    # a different network in the same folder is refused
    other = tiny_config(model={"architecture": "mtl", "base_width": 8, "input_size": 64})
    with pytest.raises(RuntimeError, match="use a new --out"):
        fit(other, tmp_path / "split", mini_data, progress=False)


@pytest.mark.slow
def test_checkpoint_every_saves_resumable_state_less_often(
    mini_data: Path, tmp_path: Path, tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.trainer as trainer

    saved: list[int] = []
    real_save = trainer._atomic_torch_save

    def recording_save(obj: dict, path: Path) -> None:
        saved.append(int(obj["epoch"]))
        real_save(obj, path)

    monkeypatch.setattr(trainer, "_atomic_torch_save", recording_save)
    cfg = tiny_config(
        model={
            "architecture": "mtl",
            "base_width": 4,
            "input_size": 64,
            "classifier_pooling": "global_average",
        },
        train={"epochs": 5, "max_steps_per_epoch": 1, "checkpoint_every": 2},
    )
    fit(cfg, tmp_path / "run", mini_data, progress=False, max_epochs=3)
    assert saved == [2, 3]  # every 2nd epoch, and the epoch a run pauses at
    fit(cfg, tmp_path / "run", mini_data, progress=False)
    assert saved == [2, 3, 4, 5]
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == ["1", "2", "3", "4", "5"]
    _model, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta.architecture.classifier_pooling == "global_average"


def test_early_stopping_and_time_budget(mini_data: Path, tmp_path: Path, tiny_config) -> None:
    # lr so small nothing changes: the validation score cannot improve after epoch 1
    cfg = tiny_config(
        train={"epochs": 10, "max_steps_per_epoch": 1, "lr": 1e-12, "patience": 2},
        augment={"enabled": False},
    )
    res = fit(cfg, tmp_path / "es", mini_data, progress=False)
    assert res.stopped.startswith("early stop") and res.epochs_run == 3
    assert res.best_epoch == 1

    budget = tiny_config(train={"epochs": 10, "max_minutes": 1e-4})
    res = fit(budget, tmp_path / "budget", mini_data, progress=False)
    assert res.stopped.startswith("time budget") and res.epochs_run == 1
    assert int(_rows(tmp_path / "budget")[0]["step"]) == 1


def test_fine_tune_from_release_style_checkpoint_on_dicom_seg(
    data_dir: Path, tmp_path: Path, tiny_config, make_seg_case
) -> None:
    """A corrected series (CT + SEG) becomes training data for a network initialised from
    an inference-only checkpoint (no reconstruction head)."""
    from mtl_model import save_checkpoint
    from training.trainer import build_metadata

    make_seg_case(data_dir, tmp_path / "corrected" / "case1", n=4)
    torch.manual_seed(1)
    src = build_model("mtl", 4, 64, tasks=("segmentation", "classification"))
    ck = tmp_path / "release.safetensors"
    save_checkpoint(src.eval(), build_metadata(tiny_config(), {}, {}, "src"), ck)
    cfg = tiny_config(
        data={
            "train": [{"kind": "dicom_seg", "path": str(tmp_path / "corrected"), "split": "all"}],
            "val": [{"kind": "dicom_seg", "path": str(tmp_path / "corrected"), "split": "all"}],
        },
        train={"epochs": 1, "batch_size": 2, "lr": 1e-12, "init_from": str(ck)},
    )
    res = fit(cfg, tmp_path / "ft", tmp_path, progress=False)
    assert res.epochs_run == 1 and "dice" in res.best_metrics
    last = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    w = "encoder.blocks.0.0.weight"
    torch.testing.assert_close(last[w], src.state_dict()[w], rtol=0, atol=1e-6)
    assert any(k.startswith("reconstruction.") for k in last)  # fresh T1 head added
    bad = tiny_config(
        model={"architecture": "mtl", "base_width": 8, "input_size": 64},
        train={"epochs": 1, "init_from": str(ck)},
    )
    with pytest.raises(RuntimeError, match="differ in shape"):
        fit(bad, tmp_path / "bad", tmp_path, progress=False)


@pytest.mark.slow
def test_frozen_modules_keep_weights_and_batchnorm_statistics(
    mini_data: Path, tmp_path: Path, tiny_config
) -> None:
    """Fine-tuning the lesion decoder alone leaves encoder and classifier bit-identical."""
    from mtl_model import save_checkpoint
    from training.trainer import TrainingError, build_metadata

    torch.manual_seed(2)
    src = build_model("mtl", 4, 64, tasks=("segmentation", "classification"))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained release has
        src.train()(torch.rand(8, 1, 64, 64))
    ck = tmp_path / "release.safetensors"
    save_checkpoint(src.eval(), build_metadata(tiny_config(), {}, {}, "src"), ck)
    cfg = tiny_config(
        model={"architecture": "mtl", "base_width": 4, "input_size": 64,
               "tasks": ["segmentation", "classification"]},
        train={"epochs": 2, "max_steps_per_epoch": 3, "lr": 1e-2, "init_from": str(ck),
               "freeze": ["encoder", "classification"]},
    )  # fmt: skip
    fit(cfg, tmp_path / "ft", mini_data, progress=False)
    last = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    before = src.state_dict()
    frozen = [k for k in before if k.split(".")[0] in ("encoder", "classification")]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(last[k], before[k]), k
    changed = [k for k in before if k.startswith("segmentation.") and k.endswith("weight")]
    assert changed and all(not torch.equal(last[k], before[k]) for k in changed)

    unfrozen = cfg.model_copy(update={"train": cfg.train.model_copy(update={"freeze": []})})
    with pytest.raises(TrainingError, match=r"trained with train.freeze \['encoder'"):
        fit(unfrozen, tmp_path / "ft", mini_data, progress=False)  # resume: Adam state differs

    for freeze, match in (
        (["encoder", "decoder"], r"does not have \(its modules: \['classification', 'encoder'"),
        (["encoder", "segmentation", "classification"], "leaves nothing to train"),
    ):
        bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"freeze": freeze})})
        with pytest.raises(TrainingError, match=match):
            fit(bad, tmp_path / f"bad{len(freeze)}", mini_data, progress=False)


def test_freeze_batchnorm_keeps_running_statistics_and_trains_the_rest(
    mini_data: Path, tmp_path: Path, tiny_config
) -> None:
    """Small-batch fine-tuning: every BatchNorm keeps its statistics, weights still move."""
    from mtl_model import save_checkpoint
    from training.trainer import build_metadata

    torch.manual_seed(3)
    src = build_model("mtl", 4, 64, tasks=("segmentation", "classification"))
    with torch.no_grad():
        src.train()(torch.rand(8, 1, 64, 64))
    ck = tmp_path / "release.safetensors"
    save_checkpoint(src.eval(), build_metadata(tiny_config(), {}, {}, "src"), ck)
    before = src.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats
    for freeze_batchnorm in (True, False):
        cfg = tiny_config(
            model={"architecture": "mtl", "base_width": 4, "input_size": 64,
                   "tasks": ["segmentation", "classification"]},
            train={"epochs": 1, "max_steps_per_epoch": 3, "lr": 1e-2, "init_from": str(ck),
                   "freeze_batchnorm": freeze_batchnorm},
        )  # fmt: skip
        out = tmp_path / f"ft_{freeze_batchnorm}"
        fit(cfg, out, mini_data, progress=False)
        last = torch.load(out / "last.pt", weights_only=False)["model"]
        kept = [k for k in stats if torch.equal(last[k], before[k])]
        assert kept == (stats if freeze_batchnorm else []), freeze_batchnorm
        moved = [k for k in before if k.endswith("weight") and not torch.equal(last[k], before[k])]
        assert any(".1.weight" in k for k in moved)  # BatchNorm scales train either way
        assert any(k.startswith("encoder.") and ".0.weight" in k for k in moved)


@pytest.mark.slow
def test_swa_averages_the_epochs_also_across_resumes(
    mini_data: Path, tmp_path: Path, tiny_config
) -> None:
    """swa.safetensors holds the mean of the weights at the end of epochs swa_start..last,
    whether the run was split or not, with BatchNorm statistics measured afresh."""
    cfg = tiny_config(train={"epochs": 4, "max_steps_per_epoch": 3, "lr": 1e-2, "swa_start": 2})
    split = tmp_path / "split"
    ends = []
    for e in range(1, 5):
        fit(cfg, split, mini_data, progress=False, max_epochs=e)
        ends.append(torch.load(split / "last.pt", weights_only=False)["model"])
        assert (split / "swa.safetensors").exists() == (e >= 2)
    model, meta = load_checkpoint(split / "swa.safetensors")
    got = model.state_dict()
    convs = [k for k in got if k.endswith(".weight") and got[k].dim() == 4]
    assert len(convs) > 5
    for k in convs:
        mean = torch.stack([ends[i][k].float() for i in (1, 2, 3)]).mean(0)
        torch.testing.assert_close(got[k], mean, rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.allclose(got[k], ends[3][k], atol=1e-6), k  # not the last epoch's
    stats = [k for k in got if k.endswith("running_mean")]
    averaged = {k: torch.stack([ends[i][k] for i in (1, 2, 3)]).mean(0) for k in stats}
    assert all(not torch.allclose(got[k], averaged[k], atol=1e-4) for k in stats)
    assert meta.training["swa"] == {"first_epoch": 2, "last_epoch": 4, "epochs": 3}
    summary = json.loads((split / "summary.json").read_text())
    assert summary["swa"]["epochs"] == 3 and "auc" in summary["swa"]["metrics_network_grid"]

    fit(cfg, tmp_path / "straight", mini_data, progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "swa.safetensors")[0].state_dict()
    for k, v in got.items():
        torch.testing.assert_close(straight[k], v, rtol=0, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="swa_start 5 is after the last epoch"):
        tiny_config(train={"epochs": 4, "swa_start": 5})


def test_swa_batchnorm_statistics_are_the_plain_mean_of_the_batches() -> None:
    """Each BatchNorm outside ``keep`` gets the mean of the batches' statistics (not an
    exponential average, which would weight the last batches most); kept layers keep theirs,
    and the layers get their momentum back for a later fine-tune."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    )
    frozen = net[2]
    frozen.running_mean.fill_(3.0)
    frozen.running_var.fill_(5.0)
    avg = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    avg["0.weight"] = torch.tensor([1.0, -2.0]).view(2, 1, 1, 1)
    batches = [torch.randn(4, 1, 3, 3) * s + m for s, m in ((1, 0), (2, 5), (0.5, -3))]
    swa = _swa_model(net, avg, iter(batches), [frozen], torch.device("cpu"), "fp32")
    outs = [torch.nn.functional.conv2d(x, avg["0.weight"]) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)
    torch.testing.assert_close(swa[1].running_mean, mean)
    torch.testing.assert_close(swa[1].running_var, var)
    assert torch.equal(swa[2].running_mean, torch.full((2,), 3.0))
    assert torch.equal(swa[2].running_var, torch.full((2,), 5.0))
    assert swa[1].momentum == 0.1 and not swa.training
    assert torch.equal(net[1].running_mean, torch.zeros(2))  # the trained model is untouched
