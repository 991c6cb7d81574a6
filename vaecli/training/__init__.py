"""Fitting a model: the jitted update and loop, optimizer, checkpoints, background outputs, `vae train`'s run.

run.py orchestrates one `vae train`; loop.py holds the compiled steps; checkpoint.py saves and restores.
May import: vaecli.common, data, models, runs.
"""
