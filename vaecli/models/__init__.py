"""What a model is: layers, likelihoods, objectives, each architecture (a new model family is a module here).

The Flax modules train; sampling.py draws from any of them (z ~ p(z), z ~ q(z|x)), keyed by index.
May import: vaecli.common (never data, runs, training, inference or cli).
"""
