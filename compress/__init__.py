"""Minitron-style compression: teacher loading, calibration text, importance, pruning, distillation."""
