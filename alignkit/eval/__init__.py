"""Evaluation metrics computed from model outputs or metrics files (never inside a training loop's math)."""

from .calibration import expected_calibration_error, pairwise_accuracy, preference_calibration_error, reliability_bins

__all__ = ["expected_calibration_error", "pairwise_accuracy", "preference_calibration_error", "reliability_bins"]
