"""The device profile of a training run: `train.profile` (auto | cpu | gpu) resolved against the
GPUs TensorFlow sees, into the effective training params, precision and XLA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline_steps.core.config import TrainParams
from pipeline_steps.core.errors import ConfigError


@dataclass(frozen=True)
class DeviceProfile:
    """How training uses the machine: `train.profile` resolved against the devices present."""

    name: str  # cpu | gpu
    mixed_precision: bool  # float16 compute, float32 weights and heads
    jit_compile: bool  # XLA

    def describe(self, params: TrainParams) -> dict[str, Any]:
        return {
            "profile": self.name,
            "mixed_precision": self.mixed_precision,
            "jit_compile": self.jit_compile,
            "width": params.width,
            "batch_size": params.batch_size,
            "crop_size": params.crop_size,
        }


# What the gpu profile changes: a wider model on larger batches of larger crops, in mixed
# precision under XLA. The cpu profile is params.yaml as written (sized for 2 cores).
GPU_WIDTH_FACTOR = 2
GPU_BATCH_FACTOR = 4
GPU_CROP_FACTOR = 2


def resolve_profile(
    params: TrainParams, n_gpus: int, input_size: int
) -> tuple[TrainParams, DeviceProfile]:
    """`params.profile` against the GPUs TensorFlow sees: the effective params and the profile.

    `auto` picks gpu when there is one; asking for gpu without one is a ConfigError (a run would
    otherwise silently take hours on the CPU).
    """
    wanted = params.profile
    if wanted == "auto":
        wanted = "gpu" if n_gpus else "cpu"
    if wanted == "cpu":
        return params, DeviceProfile("cpu", mixed_precision=False, jit_compile=False)
    if not n_gpus:
        raise ConfigError(
            "train.profile is gpu but TensorFlow sees no GPU; set train.profile to auto or cpu"
        )
    crop = params.crop_size and min(params.crop_size * GPU_CROP_FACTOR, input_size)
    gpu = params.model_copy(
        update={
            "width": params.width * GPU_WIDTH_FACTOR,
            "batch_size": params.batch_size * GPU_BATCH_FACTOR,
            "crop_size": 0 if crop == input_size else crop,
        }
    )
    return gpu, DeviceProfile("gpu", mixed_precision=True, jit_compile=True)


def visible_gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))
