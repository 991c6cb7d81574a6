"""Tests for vaecli.data.folder: any image folder as a dataset, its labels, split, notices and cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
from image_folders import colourful_picture, write_image_folder
from PIL import Image

from vaecli.common.errors import DataError
from vaecli.data import folder
from vaecli.data.folder import DecodedFolder, load_folder, path_hash_order, split_folder

READABLE_COUNT = 13  # 6 cats, 6 dogs, 1 loose at the top
CONSIDERED_COUNT = 15  # ... plus broken.png and notes.txt; hidden files are not looked at


# --- helpers -------------------------------------------------------------------------------------


def write_mixed_folder(root):
    """Six cats and six dogs in assorted formats, modes and sizes, one loose image, two non-images
    and hidden files that must be ignored."""
    rng = np.random.default_rng(0)

    def picture(width, height, tint=(200, 90, 60)):
        return Image.fromarray(colourful_picture(rng, width, height, tint))

    for class_name, tint in (("cats", (230, 120, 40)), ("dogs", (40, 110, 230))):
        class_dir = root / class_name
        (class_dir / "nested").mkdir(parents=True)
        picture(40, 30, tint).save(class_dir / "rgb.png")
        picture(64, 64, tint).save(class_dir / "photo.jpg", quality=90)
        picture(17, 50, tint).convert("RGBA").save(class_dir / "transparent.png")
        picture(33, 21, tint).convert("L").save(class_dir / "grey.png")
        picture(25, 20, tint).convert("P").save(class_dir / "palette.gif")
        picture(50, 17, tint).save(class_dir / "nested" / "deep.png")  # still this class
    picture(20, 20).save(root / "loose.png")  # no class: label -1
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("a text file among the images")
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / ".thumbnails").mkdir()
    picture(8, 8).save(root / ".thumbnails" / "hidden.png")
    return root


@pytest.fixture
def mixed_folder(tmp_path):
    return write_mixed_folder(tmp_path / "pictures")


@pytest.fixture
def decode_calls(monkeypatch):
    """Count the files folder.py decodes (through the real decoder)."""
    calls = []
    real_decoder = folder.load_photo_input

    def counting_decoder(path, image_size, channels):
        calls.append(path)
        return real_decoder(path, image_size, channels)

    monkeypatch.setattr(folder, "load_photo_input", counting_decoder)
    return calls


def all_images(dataset) -> np.ndarray:
    return np.concatenate([dataset.train_images, dataset.val_images, dataset.test_images])


def all_labels(dataset) -> np.ndarray:
    return np.concatenate([dataset.train_labels, dataset.val_labels, dataset.test_labels])


def assert_same_dataset(first, second) -> None:
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(first, f"{split}_images"), getattr(second, f"{split}_images"))
        np.testing.assert_array_equal(getattr(first, f"{split}_labels"), getattr(second, f"{split}_labels"))
    assert first.class_names == second.class_names and first.notices == second.notices


# --- reading a folder -----------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "image_shape"), [(1, (16, 16)), (3, (16, 16, 3))])
def test_every_readable_image_is_loaded_at_the_asked_size(mixed_folder, tmp_path, channels, image_shape):
    dataset = load_folder(mixed_folder, 16, channels, cache_root=tmp_path / "cache")

    assert dataset.name == "folder" and dataset.preprocessing == "resize_crop"
    assert dataset.image_shape == image_shape
    assert all_images(dataset).dtype == np.uint8 and len(all_images(dataset)) == READABLE_COUNT
    assert (len(dataset.train_images), len(dataset.val_images), len(dataset.test_images)) == (11, 1, 1)
    assert all_labels(dataset).dtype == np.int32


def test_top_level_subfolders_are_the_classes(mixed_folder, tmp_path):
    dataset = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")

    assert dataset.class_names == ("cats", "dogs")
    labels, counts = np.unique(all_labels(dataset), return_counts=True)
    assert dict(zip(labels.tolist(), counts.tolist(), strict=True)) == {-1: 1, 0: 6, 1: 6}
    # The tints tell the classes apart: cats are red, dogs blue.
    images, labels = all_images(dataset).astype(float), all_labels(dataset)
    assert images[labels == 0][..., 0].mean() > images[labels == 0][..., 2].mean()
    assert images[labels == 1][..., 2].mean() > images[labels == 1][..., 0].mean()


def test_without_subfolders_there_are_no_classes(tmp_path):
    for index in range(4):
        Image.fromarray(np.full((10, 12), index * 60, dtype=np.uint8)).save(tmp_path / f"{index}.png")

    dataset = load_folder(tmp_path, 8, 1, cache_root=tmp_path / ".cache")

    assert dataset.class_names == ()
    assert (all_labels(dataset) == -1).all()
    assert dataset.notices == ()


def test_files_that_are_not_images_are_skipped_with_one_notice(mixed_folder, tmp_path):
    dataset = load_folder(mixed_folder, 16, 1, cache_root=tmp_path / "cache")

    assert dataset.notices == (
        f"skipped 2 of {CONSIDERED_COUNT} files under {mixed_folder} that are not readable images (e.g. broken.png)",
    )


def test_progress_is_reported_for_every_file(mixed_folder, tmp_path):
    reports = []

    load_folder(mixed_folder, 16, 1, cache_root=tmp_path / "cache", on_decode=lambda *report: reports.append(report))

    assert reports == [(done, CONSIDERED_COUNT) for done in range(1, CONSIDERED_COUNT + 1)]


def test_helper_folder_loads_with_its_corrupt_file_skipped(tmp_path):
    root = write_image_folder(tmp_path / "helper", count_per_class=4)

    dataset = load_folder(root, 12, 3, cache_root=tmp_path / "cache")

    assert len(all_images(dataset)) == 8 and dataset.class_names == ("cats", "dogs")
    assert len(dataset.notices) == 1 and "skipped 1 of 9" in dataset.notices[0]


# --- the split ------------------------------------------------------------------------------------


def numbered_folder(count: int) -> DecodedFolder:
    """A decoded folder whose image i is filled with i, so a split's members can be read off."""
    return DecodedFolder(
        images=np.arange(count, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), dtype=np.uint8),
        labels=np.full(count, -1, dtype=np.int32),
        relative_paths=tuple(f"image_{index:03d}.png" for index in range(count)),
        class_names=(),
        skipped_count=0,
        skipped_example=None,
    )


@pytest.mark.parametrize(("count", "held_out"), [(3, 1), (19, 1), (20, 2), (57, 5)])
def test_split_sizes_cover_every_image_once(count, held_out):
    dataset = split_folder(numbered_folder(count), notices=())

    members = [
        set(images[:, 0, 0].tolist()) for images in (dataset.train_images, dataset.val_images, dataset.test_images)
    ]
    assert [len(split) for split in members] == [count - 2 * held_out, held_out, held_out]
    assert set.union(*members) == set(range(count))


def test_split_is_the_same_every_time_and_for_every_cache(mixed_folder, tmp_path):
    first = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "one")
    second = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "two")

    assert_same_dataset(first, second)


def test_adding_files_keeps_the_order_of_the_others():
    paths = [f"cats/{index}.png" for index in range(30)]
    order = [paths[index] for index in path_hash_order(paths)]

    grown = [*paths, "dogs/new.png", "aardvark.jpg"]
    grown_order = [grown[index] for index in path_hash_order(grown)]

    assert [path for path in grown_order if path in paths] == order


# --- errors ---------------------------------------------------------------------------------------


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as raised:
        load_folder(tmp_path / "nowhere", 16, 1, cache_root=tmp_path / "cache")
    assert str(tmp_path / "nowhere") in str(raised.value)


def test_a_file_instead_of_a_folder_is_a_data_error(tmp_path):
    path = tmp_path / "picture.png"
    Image.new("L", (8, 8)).save(path)

    with pytest.raises(DataError, match="is a file, not a folder"):
        load_folder(path, 16, 1, cache_root=tmp_path / "cache")


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)

    with pytest.raises(DataError, match="no readable images") as raised:
        load_folder(tmp_path / "empty", 16, 1, cache_root=tmp_path / "cache")
    assert str(tmp_path / "empty") in str(raised.value) and "\n" not in str(raised.value)


def test_folder_of_junk_is_a_data_error(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"junk")
    (junk / "b.txt").write_text("words")

    with pytest.raises(DataError, match=r"no readable images in .*junk \(2 files looked at\)"):
        load_folder(junk, 16, 1, cache_root=tmp_path / "cache")


def test_fewer_than_three_images_is_a_data_error(tmp_path):
    for index in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")

    with pytest.raises(DataError, match="at least 3"):
        load_folder(tmp_path, 16, 1, cache_root=tmp_path / ".cache")


# --- the cache ------------------------------------------------------------------------------------


def test_second_load_reads_the_cache_and_decodes_nothing(mixed_folder, tmp_path, decode_calls):
    first = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")
    assert len(decode_calls) == CONSIDERED_COUNT
    decode_calls.clear()

    second = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")

    assert decode_calls == []
    assert_same_dataset(first, second)
    cache_dirs = list((tmp_path / "cache" / "folders").iterdir())
    assert len(cache_dirs) == 1 and len(cache_dirs[0].name) == 16
    assert sorted(path.name for path in cache_dirs[0].iterdir()) == ["images.npy", "labels.npy", "meta.json"]


def test_a_changed_file_is_read_again(mixed_folder, tmp_path, decode_calls):
    first = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")
    changed = mixed_folder / "cats" / "rgb.png"
    Image.new("RGB", (40, 30), (0, 255, 0)).save(changed)
    stamp = changed.stat().st_mtime_ns + 5_000_000_000
    os.utime(changed, ns=(stamp, stamp))  # a clear change, whatever the file system's clock resolution
    decode_calls.clear()

    second = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")

    assert len(decode_calls) == CONSIDERED_COUNT
    greenest = all_images(second)[..., 1].astype(int) - all_images(second)[..., 0]
    assert (greenest.reshape(READABLE_COUNT, -1).min(axis=1) == 255).sum() == 1
    assert not np.array_equal(all_images(first), all_images(second))


def test_an_added_image_is_picked_up(mixed_folder, tmp_path, decode_calls):
    load_folder(mixed_folder, 16, 1, cache_root=tmp_path / "cache")
    Image.new("L", (30, 30), 200).save(mixed_folder / "dogs" / "new.png")
    decode_calls.clear()

    dataset = load_folder(mixed_folder, 16, 1, cache_root=tmp_path / "cache")

    assert len(decode_calls) == CONSIDERED_COUNT + 1
    assert len(all_images(dataset)) == READABLE_COUNT + 1 and (all_labels(dataset) == 1).sum() == 7


def test_a_removed_image_is_noticed(mixed_folder, tmp_path, decode_calls):
    load_folder(mixed_folder, 16, 1, cache_root=tmp_path / "cache")
    (mixed_folder / "loose.png").unlink()
    decode_calls.clear()

    dataset = load_folder(mixed_folder, 16, 1, cache_root=tmp_path / "cache")

    assert len(decode_calls) == CONSIDERED_COUNT - 1 and len(all_images(dataset)) == READABLE_COUNT - 1


def test_each_size_and_channel_count_has_its_own_cache_entry(mixed_folder, tmp_path, decode_calls):
    small = load_folder(mixed_folder, 16, 1, cache_root=tmp_path / "cache")
    decode_calls.clear()

    large = load_folder(mixed_folder, 24, 1, cache_root=tmp_path / "cache")
    colour = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")

    assert len(decode_calls) == 2 * CONSIDERED_COUNT
    assert small.image_shape == (16, 16) and large.image_shape == (24, 24) and colour.image_shape == (16, 16, 3)
    assert len(list((tmp_path / "cache" / "folders").iterdir())) == 3


@pytest.mark.parametrize(
    ("file_name", "damage"),
    [
        ("images.npy", lambda path: path.write_bytes(path.read_bytes()[:200])),
        ("labels.npy", lambda path: np.save(path, np.zeros(3, dtype=np.int32))),
        ("meta.json", lambda path: path.write_text("{not json")),
        ("meta.json", lambda path: path.write_text("[]")),
    ],
)
def test_a_damaged_cache_is_rebuilt(mixed_folder, tmp_path, decode_calls, file_name, damage):
    first = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")
    (cache_dir,) = (tmp_path / "cache" / "folders").iterdir()
    damage(cache_dir / file_name)
    decode_calls.clear()

    second = load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")

    assert len(decode_calls) == CONSIDERED_COUNT
    assert_same_dataset(first, second)
    decode_calls.clear()
    load_folder(mixed_folder, 16, 3, cache_root=tmp_path / "cache")
    assert decode_calls == [], "the rebuilt cache is used next time"


def test_a_cache_inside_the_folder_is_not_read_as_images(mixed_folder, decode_calls):
    first = load_folder(mixed_folder, 16, 1, cache_root=mixed_folder / "cache")
    decode_calls.clear()

    second = load_folder(mixed_folder, 16, 1, cache_root=mixed_folder / "cache")

    assert decode_calls == []
    assert_same_dataset(first, second)


def test_an_unwritable_cache_is_a_notice_not_an_error(mixed_folder, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should go")

    dataset = load_folder(mixed_folder, 16, 1, cache_root=blocked)

    assert len(all_images(dataset)) == READABLE_COUNT
    assert len(dataset.notices) == 2 and "could not cache" in dataset.notices[1]
