"""Image datasets for `bench prepare`: Fashion-MNIST, scikit-learn digits, and image folders.

Every source yields uint8 RGB images `(B, 3, S, S)` and int64 labels `(B,)`, by index, so prepare
can cut them into shards and array tasks can each take a subset.

- fashion_mnist: Debian's `dataset-fashion-mnist` idx.gz files; 28x28 gray padded with zeros (the
  background) to S x S and repeated to three channels. Splits: the official train (60k) / t10k (10k).
- digits: scikit-learn's 8x8 digits (levels 0..16 scaled to 0..255), upsampled by pixel repetition
  to S x S (S a multiple of 8), three channels. Deterministic split: every fifth image (index % 5 == 0)
  is test (360), the rest train (1437). Meant for tests.
- imagefolder: `root/<class>/<image>` (ImageNet layout). With `root/train` (and `root/val` or
  `root/test`) those are the splits; otherwise `root` itself is the train split. Classes are the
  sorted subfolder names of the train split. Images get guided-diffusion's (ADM) center crop.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from bench import resources
from bench.atomic import sha256_file, sha256_json

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """The dataset is missing, empty, unreadable or does not fit the requested size."""


@dataclass
class ImageSource:
    """Images of one split, decoded on demand.

    `images(indices)` returns uint8 `(B, 3, S, S)`; `labels` is int64 `(N,)`. `fingerprint` is a
    small JSON-able description of the inputs (file hashes or a file listing) for the content hash.
    """

    name: str
    split: str
    image_size: int
    labels: torch.Tensor
    fingerprint: dict
    _array: Optional[torch.Tensor] = None
    _files: Optional[Sequence[Path]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 RGB images `(len(indices), 3, S, S)`."""
        if self._array is not None:
            return self._array[torch.as_tensor(list(indices), dtype=torch.long)]
        assert self._files is not None
        paths = [self._files[i] for i in indices]
        if len(paths) > 1:  # PIL releases the GIL while decoding and resizing
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                batch = list(pool.map(lambda p: load_image_file(p, self.image_size), paths))
        else:
            batch = [load_image_file(p, self.image_size) for p in paths]
        return torch.stack(batch) if batch else torch.zeros(0, 3, self.image_size, self.image_size,
                                                            dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (idx.gz)


def read_idx_gz(path: Path) -> np.ndarray:
    """Parse an idx file (gzip) into a uint8 array; raises DatasetError on a malformed file."""
    try:
        data = gzip.open(path).read()
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged deflate stream
        raise DatasetError(f"cannot read {path}: {err}; reinstall dataset-fashion-mnist") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DatasetError(f"{path}: header says {dims} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def pad_gray_to_rgb(gray: np.ndarray, image_size: int) -> torch.Tensor:
    """(N, h, w) uint8 gray -> (N, 3, S, S) uint8, zero-padded (centred) and repeated to RGB."""
    n, h, w = gray.shape
    if image_size < max(h, w):
        raise DatasetError(f"data.image_size={image_size} is smaller than the {h}x{w} images; "
                           f"set data.image_size >= {max(h, w)} (32 pads Fashion-MNIST by 2 px)")
    top, left = (image_size - h) // 2, (image_size - w) // 2
    out = np.zeros((n, image_size, image_size), np.uint8)
    out[:, top: top + h, left: left + w] = gray
    return torch.from_numpy(out).unsqueeze(1).expand(n, 3, image_size, image_size).contiguous()


def fashion_mnist(split: str, image_size: int = 32, root: Optional[str] = None) -> ImageSource:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` (or the same idx.gz files in `root`)."""
    _check_split(split)
    if image_size < 28:
        raise DatasetError(f"data.image_size={image_size} is smaller than Fashion-MNIST's 28x28 "
                           "images; use data.image_size=32 (zero padding of 2 px)")
    folder = Path(root or FASHION_MNIST_DIR)
    image_file, label_file = (folder / f for f in FASHION_MNIST_FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise DatasetError(f"data.root: {path} not found; install Debian's dataset-fashion-mnist "
                               f"(apt-get install dataset-fashion-mnist) or point data.root at a "
                               f"folder with the four idx.gz files")
    gray, labels = read_idx_gz(image_file), read_idx_gz(label_file)
    if gray.ndim != 3 or labels.ndim != 1 or gray.shape[0] != labels.shape[0]:
        raise DatasetError(f"{image_file}: {gray.shape} images do not match {labels.shape} labels")

    fingerprint = {"dataset": "fashion_mnist", "split": split,
                   "sha256": [sha256_file(image_file), sha256_file(label_file)]}
    return ImageSource("fashion_mnist", split, image_size, torch.from_numpy(labels.astype(np.int64)),
                       fingerprint, _array=pad_gray_to_rgb(gray, image_size))


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def digits(split: str, image_size: int = 32) -> ImageSource:
    """scikit-learn's digits, upsampled 8 -> S by pixel repetition; deterministic split."""
    load_digits = resources.require("sklearn.datasets", "data.name=digits").load_digits
    _check_split(split)
    if image_size % 8 != 0:
        raise DatasetError(f"data.image_size={image_size}: digits are 8x8 and are upsampled by "
                           "an integer factor; use a multiple of 8 (32 is the default)")
    bunch = load_digits()
    values = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # levels 0..16 -> 0..255
    keep = (np.arange(len(values)) % 5 == 0) if split == "test" else (np.arange(len(values)) % 5 != 0)
    factor = image_size // 8
    big = values[keep].repeat(factor, axis=1).repeat(factor, axis=2)
    images = torch.from_numpy(big).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target[keep].astype(np.int64))
    return ImageSource("digits", split, image_size, labels,
                       {"dataset": "sklearn_digits", "split": split, "n": int(keep.sum())},
                       _array=images)


# ---------------------------------------------------------------------------------------------
# Image folders with the ADM center crop


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """guided-diffusion's center crop: halve with BOX while the short side >= 2*S, BICUBIC-resize
    the short side to S, crop the centre. `image` is a PIL image; returns uint8 (S, S, 3)."""
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def load_image_file(path: Path, image_size: int) -> torch.Tensor:
    """Decode one image file and center-crop it: uint8 `(3, S, S)`; DatasetError names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot decode image {path}: {err}; remove or replace the file") from err
    arr = center_crop_arr(image, image_size)
    if arr.shape != (image_size, image_size, 3):
        raise DatasetError(f"image {path} ({image.size[0]}x{image.size[1]}) gave a crop of shape "
                           f"{arr.shape}, not {image_size}x{image_size}x3")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _split_folder(root: Path, split: str) -> Optional[Path]:
    if (root / "train").is_dir():
        if split == "train":
            return root / "train"
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / name
        return None
    return root if split == "train" else None


def image_folder(split: str, image_size: int, root: Optional[str]) -> ImageSource:
    """`root/<class>/<file>` images (or `root/{train,val}/<class>/<file>`), ADM center-cropped."""
    _check_split(split)
    if image_size not in (256, 512):
        raise DatasetError(f"data.image_size={image_size}: the image-folder pipeline follows ADM/REPA "
                           "preprocessing at 256 or 512; set data.image_size to 256 or 512")
    if not root:
        raise DatasetError("data.root is not set; point data.root at an image folder "
                           "(root/<class>/<image> or root/train/<class>/<image>)")
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"data.root: folder {base} not found")
    train_dir = _split_folder(base, "train")
    folder = _split_folder(base, split)
    if folder is None:
        raise DatasetError(f"data.root={base} has no {split} split; add {base}/val/<class>/... "
                           f"next to {base}/train, or prepare only the train split")
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if not classes:
        raise DatasetError(f"data.root: {train_dir} has no class subfolders; expected "
                           f"{train_dir}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(entry.path))
                labels.append(label)
    if not files:
        raise DatasetError(f"data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                           f"{folder}/<class>/; the folder is empty")
    listing = [[str(p.relative_to(base)), p.stat().st_size] for p in files]

    fingerprint = {"dataset": "imagefolder", "split": split, "num_classes": len(classes),
                   "listing_sha256": sha256_json(listing)}
    return ImageSource("imagefolder", split, image_size, torch.tensor(labels, dtype=torch.long),
                       fingerprint, _files=files)


# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split={split!r} is not allowed; choose one of {list(SPLITS)}")


def open_split(cfg_data, split: str) -> ImageSource:
    """The ImageSource for `cfg_data` (a `bench.config.DataConfig`) and `split`."""
    if cfg_data.name == "fashion_mnist":
        return fashion_mnist(split, cfg_data.image_size, cfg_data.root)
    if cfg_data.name == "digits":
        return digits(split, cfg_data.image_size)
    if cfg_data.name == "imagefolder":
        return image_folder(split, cfg_data.image_size, cfg_data.root)
    raise DatasetError(f"data.name={cfg_data.name!r} is not a known dataset")


def fashion_mnist_available(root: Optional[str] = None) -> bool:
    """True when the Fashion-MNIST idx.gz files are present (tests skip or fall back otherwise)."""
    folder = Path(root or FASHION_MNIST_DIR)
    return all((folder / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair)
