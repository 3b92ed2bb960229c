"""Stage 4: scores, anomaly maps and Grad-CAM from a trained run."""
