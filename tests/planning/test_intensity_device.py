"""The network input made on the device (planning.intensity.network_input_on_device) is the host's, to the bit."""

import numpy as np
import pytest
import torch

from cellseg.errors import ParameterError
from cellseg.planning.intensity import (
    IntensityRange,
    as_network_input,
    network_input_on_device,
    select_channels,
)


@pytest.mark.parametrize("dtype, channels, scale", [
    (np.uint8, 3, 1.0), (np.uint8, 1, 1.0), (np.uint16, 1, 1.0), (np.float32, 1, 1.0), (np.float64, 3, 1.0),
    (np.uint8, 3, 1.6), (np.uint16, 1, 2.0),
])
def test_device_input_equals_the_hosts(dtype, channels, scale):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        raw = rng.normal(100, 80, (37, 41, channels)).astype(dtype)
        raw[3, 4, 0] = np.nan                      # NaN becomes 0 on both
    else:
        raw = rng.integers(0, np.iinfo(dtype).max, (37, 41, channels), endpoint=True).astype(dtype)
    intensity = IntensityRange(1000.0, 50000.0) if dtype == np.uint16 else IntensityRange(12.5, 180.25)
    host = as_network_input(raw, raw.shape[:2], None, intensity, scale)
    device = network_input_on_device(torch.from_numpy(select_channels(raw, None)), host.shape[1:], intensity, scale)
    assert device.dtype == torch.float32 and tuple(device.shape) == host.shape
    assert np.array_equal(device.numpy(), host)


def test_shrinking_stays_on_the_host():
    with pytest.raises(ParameterError, match="scale >= 1"):
        network_input_on_device(torch.zeros(8, 8, 1, dtype=torch.uint8), (4, 4), IntensityRange(0.0, 1.0), 0.5)
