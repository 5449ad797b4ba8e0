"""Small parts of the training loop, tested without starting ranks."""

from __future__ import annotations

from pretrain.trainer import SpikeDetector


def test_spike_detector_flags_only_outliers() -> None:
    detector = SpikeDetector(window=50, threshold=4.0)
    flagged = [detector.add(3.0 + 0.01 * (i % 5)) for i in range(40)]
    assert flagged == [None] * 40
    assert detector.add(3.5) is not None  # far above a flat window
    assert detector.add(3.02) is None
