"""vaecli: train a variational autoencoder on images, then sample its prior and reconstruct through its posterior.

Subpackages, lowest layer first; each imports only from those before it (tests/test_import_layers.py):
common -> data -> models -> runs -> training -> inference -> cli.
"""
