"""Datasets as uint8 arrays split into train / val / test: a new dataset is one module here, named in datasets.py.

IDX files and downloads (the MNIST family), the CIFAR-10 archive, image folders, the offline sets made from the sample.
May import: vaecli.common.
"""
