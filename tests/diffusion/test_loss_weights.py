"""Min-SNR-gamma and P2 weights against their closed forms."""

import numpy as np
import pytest
import torch

from diffusion.losses import min_snr_weight, p2_weight, snr
from diffusion.schedules import get_named_beta_schedule


def test_snr_of_the_linear_schedule():
    abar = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    s = snr(abar)
    assert np.allclose(s, abar / (1 - abar), rtol=1e-15)
    assert np.all(np.diff(s) < 0)  # SNR decreases with t


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(gamma):
    s = torch.logspace(-4, 4, 41, dtype=torch.float64)
    sn = s.numpy()
    assert np.allclose(min_snr_weight(s, gamma, "epsilon").numpy(), np.minimum(sn, gamma) / sn, rtol=1e-15)
    assert np.allclose(
        min_snr_weight(s, gamma, "velocity").numpy(), np.minimum(sn, gamma) / (sn + 1), rtol=1e-15
    )
    assert np.allclose(min_snr_weight(s, gamma, "x0").numpy(), np.minimum(sn, gamma), rtol=1e-15)
    # low SNR (noisy) steps keep weight 1 for eps; high SNR steps are down-weighted to gamma / SNR
    assert min_snr_weight(torch.tensor(0.5), gamma, "epsilon") == 1
    with pytest.raises(ValueError, match="unknown target"):
        min_snr_weight(s, gamma, "score")


@pytest.mark.parametrize("gamma,k", [(1.0, 1.0), (0.5, 1.0), (0.5, 2.0)])
def test_p2_weights(gamma, k):
    s = torch.logspace(-4, 4, 41, dtype=torch.float64)
    assert np.allclose(p2_weight(s, gamma, k).numpy(), 1 / (k + s.numpy()) ** gamma, rtol=1e-15)
