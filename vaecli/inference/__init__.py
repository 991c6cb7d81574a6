"""Using a trained model: opening a run for inference, sampling outputs, samplers, evaluation, latent views.

A new command's library function (what the CLI calls) goes here when it uses a trained model.
May import: vaecli.common, data, models, runs, training (training only to restore a checkpoint).
"""
