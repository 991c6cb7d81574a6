"""Where the downloadable datasets come from: mirrors, file names, published SHA-256 and sizes.

The MNIST family's checksums and sizes are those tensorflow-datasets publishes in its
url_checksums/{mnist,fashion_mnist,kmnist}.txt; every one of them uses the same four IDX file names.
CIFAR-10 is one archive, see CIFAR10_SOURCE.
"""

from __future__ import annotations

from dataclasses import dataclass

IDX_FILE_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and what it must hash to."""

    name: str  # e.g. "train-images-idx3-ubyte.gz"
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class DatasetSource:
    """A dataset's mirrors, tried in order, and its files."""

    name: str
    mirrors: tuple[str, ...]  # base URLs ending in "/"
    files: tuple[RemoteFile, ...]
    description: str
    licence: str


IDX_SOURCES: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        name="mnist",
        mirrors=(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                9912422,
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542
            ),
        ),
        description="handwritten digits 0-9, 28x28 grey",
        licence="CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. J. C. Burges)",
    ),
    "fashion_mnist": DatasetSource(
        name="fashion_mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                26421880,
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148
            ),
        ),
        description="Zalando clothing in 10 classes, 28x28 grey",
        licence="MIT (Zalando Research)",
    ),
    "kmnist": DatasetSource(
        name="kmnist",
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
                18165135,
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz", "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17", 29497
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz", "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5", 3041136
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz", "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c", 5120
            ),
        ),
        description="cursive Japanese (Kuzushiji) characters in 10 classes, 28x28 grey",
        licence="CC BY-SA 4.0 (ROIS-DS Center for Open Data in the Humanities)",
    ),
}

# The "python version" archive: cifar-10-batches-py/data_batch_1..5, test_batch and batches.meta, pickled.
# Its SHA-256 is the file_hash Keras' loader checks (keras-team/keras, keras/src/datasets/cifar10.py) and the
# one tensorflow-datasets recorded for this URL (url_checksums/cifar10.csv); 170,498,071 bytes as served.
CIFAR10_SOURCE = DatasetSource(
    name="cifar10",
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    files=(
        RemoteFile(
            "cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170498071
        ),
    ),
    description="photographs in 10 classes, 32x32 colour",
    licence="no licence stated; cite Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009",
)
