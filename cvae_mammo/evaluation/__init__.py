"""Stage 5: thresholds, metrics and the side-by-side report."""
