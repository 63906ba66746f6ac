"""The multi-task COVID-19 CT network (Amyar et al. 2020): model, checkpoints, inference.

Knows nothing of DICOM networking or of training loops; both build on it.
"""

from mtl_model.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    default_checkpoint_path,
    load_checkpoint,
    new_device_uid,
    read_metadata,
    save_checkpoint,
)
from mtl_model.network import CNN8, TASKS, MTLNet, UNet, build_model, model_tasks
from mtl_model.predictor import Prediction, Predictor, native_bf16, resolve_device
from mtl_model.preprocessing import LUNG_WINDOW, HUWindow, hu_to_unit, resize_slices, uint8_to_unit

__all__ = [
    "CNN8",
    "LUNG_WINDOW",
    "TASKS",
    "CheckpointError",
    "CheckpointMetadata",
    "HUWindow",
    "MTLNet",
    "Prediction",
    "Predictor",
    "UNet",
    "build_model",
    "default_checkpoint_path",
    "hu_to_unit",
    "load_checkpoint",
    "model_tasks",
    "native_bf16",
    "new_device_uid",
    "read_metadata",
    "resize_slices",
    "resolve_device",
    "save_checkpoint",
    "uint8_to_unit",
]
