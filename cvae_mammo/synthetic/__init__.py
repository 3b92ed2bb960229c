"""Synthetic phantom mammograms and DICOM writers for the demo and the tests."""
