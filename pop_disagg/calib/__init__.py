"""Calibration: stage-aware layer importance with virtual gates (POP paper, Sec. 3) and the
pieces around it (calibration data, the importance profile, its plot)."""
