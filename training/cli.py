"""``ctmtl-train``: fit, evaluate and export the multi-task network.

    ctmtl-train fit --config config/train/mtl_t123_256.toml --out runs/mtl_t123_256
    ctmtl-train evaluate --checkpoint P --covid-ct DIR --split test --medseg DIR --json OUT
    ctmtl-train export --run runs/NAME --out mtl_model/weights/ctmtl-release.safetensors
        [--onnx runs/NAME/ctmtl.onnx]   (the inference heads as ONNX too)
    ctmtl-train compose --segmentation RELEASE --classification runs/CNN8/best.safetensors --out C

Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m training.cli fit ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from training.config import ConfigError, default_data_root, load_config

logger = logging.getLogger(__name__)


def _setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0 and not verbose:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    from training.trainer import fit

    cfg = load_config(args.config)
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.max_minutes is not None:
        cfg.train.max_minutes = args.max_minutes
    if args.precision is not None:
        cfg.train.precision = args.precision
    if args.seed is not None:
        cfg.seed = args.seed
    try:
        res = fit(
            cfg,
            args.out,
            args.data,
            resume=not args.no_resume,
            device=args.device,
            progress=not args.no_progress,
            max_epochs=args.stop_after,
        )
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    "out": str(res.out_dir),
                    "best_epoch": res.best_epoch,
                    "best_score": res.best_score,
                    "best_metrics_network_grid": res.best_metrics,
                    "epochs_run": res.epochs_run,
                    "stopped": res.stopped,
                    "elapsed_s": round(res.elapsed_s, 1),
                }
            )
        )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    if args.covid_ct is None and args.medseg is None:
        raise ConfigError("evaluate needs --covid-ct and/or --medseg")
    result = evaluate(
        checkpoint=args.checkpoint,
        covid_ct=args.covid_ct,
        split=args.split,
        medseg=args.medseg,
        medseg_split=args.medseg_split,
        json_out=args.json,
        report_dir=args.report_dir,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        n_boot=args.bootstrap,
        engine=args.engine,
    )
    print(json.dumps({k: result[k] for k in ("classification", "segmentation") if k in result}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_release

    path = export_release(
        run_dir=args.run,
        out=args.out,
        checkpoint=args.checkpoint,
        version=args.version,
        data_root=args.data,
        evaluate_val=not args.no_eval,
        notes=args.notes,
        device=args.device,
    )
    out: dict[str, object] = {"exported": str(path), "bytes": path.stat().st_size}
    if args.onnx is not None:
        from training.export import export_onnx

        onnx_path = export_onnx(path, args.onnx)
        out["onnx"] = str(onnx_path)
        out["onnx_bytes"] = onnx_path.stat().st_size
    print(json.dumps(out))
    return 0


def _cmd_compose(args: argparse.Namespace) -> int:
    from training.export import compose_checkpoint

    path = compose_checkpoint(args.segmentation, args.classification, args.out, flip=args.flip)
    print(json.dumps({"composed": str(path), "bytes": path.stat().st_size}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctmtl-train", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train an experiment config into a run folder")
    f.add_argument("--config", required=True, type=Path)
    f.add_argument("--out", required=True, type=Path, help="run folder (resumed if it exists)")
    f.add_argument("--data", type=Path, default=None, help=f"data root ({default_data_root()})")
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    f.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    f.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    f.add_argument("--max-minutes", type=float, default=None, help="override train.max_minutes")
    f.add_argument("--seed", type=int, default=None, help="override seed (ensemble members)")
    f.add_argument(
        "--stop-after", type=int, default=None, help="pause after this epoch (resumable)"
    )
    f.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_cmd_fit)

    e = sub.add_parser("evaluate", help="score a checkpoint (JSON contract of DESIGN.md)")
    e.add_argument("--checkpoint", type=Path, default=None, help="default: the release")
    e.add_argument("--covid-ct", type=Path, default=None, help="UCSD COVID-CT folder")
    e.add_argument("--split", default="test", help="UCSD split list name (train/val/test/all)")
    e.add_argument("--medseg", type=Path, default=None, help="MedSeg folder (PNG or NIfTI)")
    e.add_argument(
        "--medseg-split",
        default=None,
        choices=["train", "val", "all"],
        help="MedSeg portion; default: 'all' for --split test, else the same as --split",
    )
    e.add_argument("--json", type=Path, required=True, help="where to write the JSON result")
    e.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help="ROC/overlay PNGs + report.md (default: next to --json, <name>_report/)",
    )
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "openvino", "auto"],
        help="inference engine (openvino: ctmtl[openvino], CPU; auto: it where installed)",
    )
    e.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32", "int8"],
        help="int8: OpenVINO only (its auto)",
    )
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs")
    e.set_defaults(func=_cmd_evaluate)

    x = sub.add_parser("export", help="write an inference-only fp16 release checkpoint")
    x.add_argument("--run", type=Path, default=None, help="run folder (uses best.safetensors)")
    x.add_argument("--checkpoint", type=Path, default=None, help="or a checkpoint file")
    x.add_argument("--out", type=Path, default=None, help="default: the release path")
    x.add_argument("--version", default=None, help="model_version to record")
    x.add_argument("--data", type=Path, default=None, help="data root for validation metrics")
    x.add_argument("--no-eval", action="store_true", help="skip the validation evaluation")
    x.add_argument("--notes", default=None, help="free text recorded in the metadata")
    x.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    x.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the inference heads (segmentation + classification) as ONNX "
        "(needs ctmtl[onnx])",
    )
    x.set_defaults(func=_cmd_export)

    c = sub.add_parser(
        "compose",
        help="join an mtl checkpoint's lesion network and an 8-layer CNN classifier",
        description="Write one mtl checkpoint (float32) whose encoder and lesion decoder come "
        "from --segmentation and whose classifier (T3, classifier_pooling 'image_cnn8') is "
        "the 8-layer CNN of --classification (or the mean of several, and with --flip of "
        "each slice's mirror too); export it with 'export --checkpoint'.",
    )
    c.add_argument("--segmentation", required=True, type=Path, help="mtl checkpoint")
    c.add_argument(
        "--classification",
        required=True,
        type=Path,
        nargs="+",
        help="cnn8 checkpoint(s); several of one width make an ensemble (mean logit)",
    )
    c.add_argument(
        "--flip", action="store_true", help="the classifier also sees each slice mirrored"
    )
    c.add_argument("--out", required=True, type=Path, help="composed checkpoint file")
    c.set_defaults(func=_cmd_compose)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        rc: int = args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        logger.debug("failed", exc_info=True)
        print(f"ctmtl-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
