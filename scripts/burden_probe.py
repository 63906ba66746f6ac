"""Does the lesion burden tell COVID-19 from non-COVID on UCSD, next to the slice classifier?

    python scripts/burden_probe.py [--checkpoint P] [--data DIR] [--json OUT]

Issue 12 asks whether the series decision should fold in the segmentation's lesion
burden. A rule that combines the two has to be fitted on developer data, and the only
developer data with both classes and many images is UCSD COVID-CT. So this runs the
checkpoint through `mtl_model.Predictor`, as `ctmtl-train evaluate` does, over the UCSD
train and val splits and prints, per split, the AUC of the slice COVID-19 probability
and of two burden figures of the same slice: the share of pixels at lesion probability
0.5 or more, and the mean lesion probability. A burden with no signal on UCSD cannot be
fitted into a rule there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mtl_model.metrics import roc_auc
from mtl_model.predictor import Predictor
from mtl_model.stacks import default_data_root
from training.data import covid_ct_files
from training.evaluate import ucsd_network_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="default: the shipped release")
    parser.add_argument("--data", help="data folder (default $CTMTL_DATA or ../shared/data)")
    parser.add_argument("--json", help="also write the figures and per-image rows here")
    args = parser.parse_args()
    root = Path(args.data) if args.data else default_data_root()
    predictor = Predictor(args.checkpoint, engine="auto")
    result: dict[str, object] = {
        "model": f"{predictor.metadata.model_name} {predictor.metadata.model_version}",
        "engine": f"{predictor.engine} {predictor.precision}",
    }
    for split in ("train", "val"):
        items = covid_ct_files(root / "covid-ct", split)
        labels, covid, share, mean = [], [], [], []
        for start in range(0, len(items), predictor.batch_size):
            chunk = items[start : start + predictor.batch_size]
            x = np.stack([ucsd_network_input(path, predictor.input_size) for path, _ in chunk])
            pred = predictor.predict_unit(x)
            assert pred.slice_covid_probability is not None
            assert pred.lesion_probability is not None
            for (_, label), p, lesion in zip(
                chunk, pred.slice_covid_probability, pred.lesion_probability, strict=True
            ):
                labels.append(int(label))
                covid.append(float(p))
                share.append(float((lesion >= 0.5).mean()))
                mean.append(float(lesion.mean()))
        y = np.array(labels)
        figures = {
            "n": len(y),
            "auc_slice_probability": roc_auc(y, np.array(covid)),
            "auc_lesion_share": roc_auc(y, np.array(share)),
            "auc_mean_lesion_probability": roc_auc(y, np.array(mean)),
            "mean_lesion_share_covid": float(np.mean(np.array(share)[y == 1])),
            "mean_lesion_share_non_covid": float(np.mean(np.array(share)[y == 0])),
        }
        print(split, json.dumps(figures))
        result[split] = figures
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
