"""Stage 2: dataset folders, metadata, patient-grouped splits, augmentation and tf.data pipelines."""
