"""The run directory: its paths, the trainer's lock, checkpoint identity, run summaries and curves.png.

Everything that reads or names files inside RUN/ without needing a model.
May import: vaecli.common.
"""
