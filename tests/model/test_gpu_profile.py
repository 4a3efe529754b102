"""The gpu training profile on a real GPU: mixed precision with float32 outputs, XLA, and a detector
that still learns. Skipped (by the `gpu` marker) where TensorFlow sees no GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline_steps.core.config import DetectionParams, TrainParams
from pipeline_steps.core.device_profile import resolve_profile, visible_gpus
from pipeline_steps.train import train_detector
from tests.model.test_detector_behaviour import S, make_discs

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_gpu_profile_trains_in_mixed_precision_with_float32_outputs(tmp_path: Path) -> None:
    import keras

    base = TrainParams(
        epochs=6, batch_size=4, width=8, depth=2, crop_size=0, patience=6, learning_rate=3e-3
    )
    params, profile = resolve_profile(base, visible_gpus(), S)
    assert profile.name == "gpu" and profile.mixed_precision and profile.jit_compile
    train, val = make_discs(32, seed=1), make_discs(8, seed=2)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        result = train_detector(
            lambda: iter(train),
            len(train),
            lambda: iter(val),
            len(val),
            params,
            DetectionParams(),
            S,
            tmp_path,
            profile=profile,
        )
    finally:
        keras.mixed_precision.set_global_policy(policy)
    model = result.model
    assert model.get_layer("heatmap").compute_dtype == "float32"
    assert model.get_layer("head_conv").compute_dtype == "float16"
    out = model.predict_on_batch(np.stack([image for image, _ in val])[..., None])
    assert out.dtype == np.float32 and np.isfinite(out).all()
    losses = result.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
