"""Stage 1: DICOM / PNG / PGM mammograms -> a clean dataset folder (never imports TensorFlow)."""
