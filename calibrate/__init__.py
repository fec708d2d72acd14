"""Evaluation and calibration text bundled with the project, and user-supplied sources."""

from calibrate.data import c4_eval_text, calibration_windows, eval_text, load_calibration_text

__all__ = ["c4_eval_text", "calibration_windows", "eval_text", "load_calibration_text"]
