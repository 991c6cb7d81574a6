"""Datasets as uint8 arrays split into train / val / test: a new dataset is one module here, named in datasets.py.

IDX files and downloads (the MNIST family), image folders, and the offline sets made from the shipped sample.
May import: vaecli.common.
"""
