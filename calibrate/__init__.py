"""Evaluation and calibration text bundled with the project, and user-supplied sources."""

from calibrate.data import calibration_windows, eval_text, load_calibration_text

__all__ = ["calibration_windows", "eval_text", "load_calibration_text"]
