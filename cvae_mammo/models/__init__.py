"""Keras models: the convolutional VAE and the transfer-learning classifier."""
