"""SegNet specifics: the decoder upsamples with the encoder's argmax indices."""

from __future__ import annotations

import keras
import numpy as np

from segray import models
from segray.models.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D
from segray.models.segnet import stage_layout


def test_default_layout_is_vgg16() -> None:
    assert stage_layout(5, 64, None) == [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]


def test_each_unpool_uses_the_indices_of_its_own_pool_and_nothing_else_upsamples() -> None:
    model = models.build("segnet", 2, (16, 24, 3), depth=3, width=4, convs_per_stage=1)
    for stage in (1, 2, 3):
        unpool = model.get_layer(f"unpool{stage}")
        assert isinstance(unpool, MaxUnpooling2D)
        values, argmax, reference = unpool.input
        # The argmax input is the second output of the pool of the same stage.
        pool = model.get_layer(f"pool{stage}")
        assert isinstance(pool, MaxPoolingWithArgmax2D)
        assert argmax is pool.output[1]
        assert reference is pool.input
    upsampling = (keras.layers.Conv2DTranspose, keras.layers.UpSampling2D, keras.layers.Resizing)
    assert not [layer.name for layer in model.layers if isinstance(layer, upsampling)]


def test_odd_sizes_come_back_at_the_input_size() -> None:
    model = models.build("segnet", 3, depth=3, width=4, convs_per_stage=1)
    logits = model(np.zeros((2, 33, 31, 3), np.float32))
    assert tuple(logits.shape) == (2, 33, 31, 3)
