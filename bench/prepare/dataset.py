"""The prepared-data format written by `bench prepare` and the loader the trainer uses.

Layout of a prepared folder (`data.prepared_dir`):

    manifest.json            written last; identifies everything below (settings hash, encoder,
                             grids, r_max, counts, VAE and its scaling factor, classifier) and lists
                             every file below with its size and sha256 (`files`)
    settings.json            the settings being prepared (guards against mixing two settings)
    pca.safetensors/.json    the PCA (full basis, float64) fitted on the train split
    pca_stats.safetensors    the merged float64 sums it came from
    .pca.lock                empty; array tasks read, fit and write the PCA under its lock
    vae/                     the embedded AutoencoderKL (save_pretrained), when vae.kind=embedded
    classifier/              the evaluation CNN (model.safetensors + classifier.json), if trained
    train/shard-00000.safetensors, ...   and test/...

A shard holds, for n images (row i of every tensor is one image):
    moments   float32 (n, 2*C_x, h, w)   posterior [mean, std] along channels (see encoders.py)
    semantic  float32 (n, r_max, gh, gw) PCA coordinates on the encoder grid, unwhitened:
                                         ((f - mean)/std - pca_mean) @ components[:r_max].T
    labels    int64   (n,)
    indices   int64   (n,)               the image's index in its split (provenance)
    features  float16 (n, D, gh, gw)     raw encoder features (only with encoder.store_features)

The rank r <= r_max, whitening and the resize to the latent grid are chosen at load time:
slicing the first r coordinates, dividing by sqrt(eigenvalue) and bilinear resizing
(align_corners=False) are all per-channel linear maps, so the order does not matter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bench.atomic import atomic_write_json, sha256_file

FORMAT_VERSION = "redi-bench-prepared/1"
MANIFEST = "manifest.json"
SHARD_KEYS = ("moments", "semantic", "labels", "indices")


class PreparedDataError(ValueError):
    """A prepared folder is missing, incomplete, or does not fit what the trainer asked for."""


def rebuild_command(prepared_dir: str | Path) -> str:
    """What rebuilds a damaged prepared folder (named by every corruption error)."""
    return (f"`bench prepare --verify data.prepared_dir={prepared_dir}` with the data/vae/encoder "
            "settings it was prepared with (its settings.json lists them): it checks every file and "
            "rebuilds the damaged ones")


def data_files(prepared_dir: str | Path, shards: Sequence[str]) -> list[str]:
    """The files a manifest vouches for: the shards, the PCA, and the embedded VAE and classifier."""
    root = Path(prepared_dir)
    names = list(shards) + [n for n in ("pca.safetensors", "pca.json", "pca_stats.safetensors")
                            if (root / n).is_file()]
    for folder in ("vae", "classifier"):
        if (root / folder).is_dir():
            names += sorted(str(p.relative_to(root)) for p in (root / folder).rglob("*")
                            if p.is_file() and ".tmp-" not in p.name)
    return names


def file_records(prepared_dir: str | Path, names: Sequence[str]) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of the named files (hashed now)."""

    root = Path(prepared_dir)
    return {name: {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
            for name in names}


def check_files(prepared_dir: str | Path, manifest: dict, hashes: bool = False) -> list[str]:
    """What is wrong with the files the manifest lists: missing, another size, or (hashes=True)
    other content. Sizes cost one stat per file; hashes read every byte."""

    root, problems = Path(prepared_dir), []
    for name, record in sorted((manifest.get("files") or {}).items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{path} is {path.stat().st_size} bytes, the manifest says {record['bytes']} "
                            "(truncated or overwritten)")
        elif hashes and sha256_file(path) != record["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest (corrupted)")
    return problems


def shard_name(split: str, index: int) -> str:
    """Relative path of a finished shard."""
    return f"{split}/shard-{index:05d}.safetensors"


def write_manifest(out: Path, settings_hash: str, cfg_data, cfg_encoder, vae_info, encoder_info,
                   pca, plan, classifier: Optional[dict], timings: dict) -> Path:
    """Write `manifest.json` (last, atomically): what produced the shards and what they hold.
    `plan` lists every shard as (split, shard index, image indices)."""

    splits: dict[str, dict] = {}
    for split, index, indices in plan:
        entry = splits.setdefault(split, {"shards": [], "counts": [], "count": 0})
        entry["shards"].append(shard_name(split, index))
        entry["counts"].append(len(indices))
        entry["count"] += len(indices)
    side = cfg_data.image_size // vae_info.downsample
    r_max = cfg_encoder.pca_rank_max
    vae = vae_info.to_json()
    if Path(vae_info.path) == Path(out) / "vae":  # the embedded VAE moves with the folder
        vae["path"] = "vae"
    manifest = {
        "format": FORMAT_VERSION, "settings_hash": settings_hash,
        "data": {"name": cfg_data.name, "image_size": cfg_data.image_size,
                 "num_classes": cfg_data.num_classes},
        "vae": vae, "scaling_factor": vae_info.scaling_factor,
        "latent_channels": vae_info.latent_channels, "latent_grid": [side, side],
        "encoder": encoder_info.to_json(), "semantic_grid": list(encoder_info.grid),
        "r_max": r_max, "store_features": cfg_encoder.store_features,
        "pca": {"file": "pca.safetensors", "encoder_id": pca.encoder_id, "count": pca.count,
                "num_images": pca.num_images, "source": pca.source,
                "eigenvalues": pca.eigenvalues[:r_max].tolist(),
                "explained_variance_ratio": pca.explained_variance_ratio()[:r_max].tolist()},
        "splits": splits,
        "classifier": ({"path": "classifier", "test_accuracy": classifier["test_accuracy"]}
                       if classifier else None),
        "timings": timings,
    }
    shards = [name for entry in splits.values() for name in entry["shards"]]
    manifest["files"] = file_records(out, data_files(out, shards))  # sizes + sha256, hashed now
    return atomic_write_json(Path(out) / MANIFEST, manifest)


@dataclass(frozen=True)
class Manifest(Mapping):
    """A finished prepare's `manifest.json`, read and type-checked once (`read_manifest`).

    The typed fields are the contract between `bench prepare` and the stages that read its shards
    (train, sample, evaluate, perf); `check_rank` is the one check that a PCA rank was stored. The
    JSON itself stays readable as a mapping (`manifest["encoder"]["encoder_id"]`), exactly as written.
    """

    folder: Path
    format: str
    settings_hash: str
    data: dict  # name, image_size, num_classes
    vae: dict  # VAEInfo.to_json(); its "path" is relative to `folder` for the embedded VAE
    scaling_factor: float
    latent_channels: int
    latent_grid: tuple[int, int]
    encoder: dict  # EncoderInfo.to_json(): encoder_id, grid, channels, input_size, ...
    semantic_grid: tuple[int, int]
    r_max: int  # PCA coordinates stored per token (encoder.pca_rank_max of the prepare)
    store_features: bool  # raw encoder features stored too (the REPA target)
    pca: dict
    splits: dict  # split -> {shards, counts, count}
    classifier: Optional[dict]
    timings: dict
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, folder: Path, where: str = MANIFEST) -> "Manifest":
        """Validate the JSON content; PreparedDataError names the file, the key and the fix."""
        fix = "re-run `bench prepare` with the same settings to rebuild it"
        if not isinstance(raw, dict):
            raise PreparedDataError(f"{where} is not a JSON object; {fix}")
        if raw.get("format") != FORMAT_VERSION:
            raise PreparedDataError(f"{where} has format {raw.get('format')!r}, not {FORMAT_VERSION}; "
                                    "re-run `bench prepare`")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("folder", "raw"):
                continue
            if f.name not in raw:
                raise PreparedDataError(f"{where} has no {f.name!r}; {fix}")
            value, kind = raw[f.name], _MANIFEST_TYPES[f.name]
            if kind == "grid":
                ok = isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)
                value = tuple(value) if ok else value
            elif kind is int:
                ok = _is_int(value) and value > 0
            elif kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            elif kind == "dict?":
                ok = value is None or isinstance(value, dict)
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise PreparedDataError(f"{where}: {f.name}={value!r} is not {_MANIFEST_TYPE_TEXT[f.name]}; {fix}")
            values[f.name] = value
        return cls(folder=Path(folder), raw=raw, **values)

    def check_rank(self, rank: int) -> None:
        """PreparedDataError unless 1 <= rank <= r_max: the shards hold the first r_max PCA
        coordinates, so a run may use any rank up to that (model.pca_rank)."""
        if not 1 <= rank <= self.r_max:
            raise PreparedDataError(
                f"model.pca_rank={rank} exceeds the {self.r_max} PCA coordinates stored in {self.folder} "
                f"(r_max, the encoder.pca_rank_max it was prepared with); use model.pca_rank in "
                f"[1, {self.r_max}] or re-run `bench prepare` with a larger encoder.pca_rank_max")

    # The JSON as written, read-only.
    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_MANIFEST_TYPES: dict[str, Any] = {
    "format": str, "settings_hash": str, "data": dict, "vae": dict, "scaling_factor": float,
    "latent_channels": int, "latent_grid": "grid", "encoder": dict, "semantic_grid": "grid", "r_max": int,
    "store_features": bool, "pca": dict, "splits": dict, "classifier": "dict?", "timings": dict,
}
_MANIFEST_TYPE_TEXT = {
    "format": "a string", "settings_hash": "a string", "scaling_factor": "a number > 0",
    "latent_channels": "an integer > 0", "r_max": "an integer > 0", "latent_grid": "[height, width]",
    "semantic_grid": "[height, width]", "store_features": "true or false", "classifier": "an object or null",
    **{key: "an object" for key in ("data", "vae", "encoder", "pca", "splits", "timings")},
}


def read_manifest(prepared_dir: str | Path, check: bool = True) -> Manifest:
    """The manifest of a finished prepare, or PreparedDataError saying what to run. check: every
    file it lists exists with its recorded size (cheap; `bench prepare --verify` checks hashes)."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise PreparedDataError(f"{path} not found: {prepared_dir} holds no finished prepare; run "
                                "`bench prepare` (with the same data/vae/encoder settings) first")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise PreparedDataError(f"{path} is not valid JSON ({err}); rebuild it: "
                                f"{rebuild_command(prepared_dir)}") from None
    manifest = Manifest.from_json(raw, Path(prepared_dir), str(path))
    if check:
        problems = check_files(prepared_dir, raw)
        if problems:
            raise PreparedDataError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                                        else "") + f"; rebuild: {rebuild_command(prepared_dir)}")
    return manifest


def check_manifest(manifest: Manifest, encoder_id: Optional[str] = None,
                   rank: Optional[int] = None) -> None:
    """Raise PreparedDataError when the shards come from another encoder or hold too few ranks."""
    if encoder_id is not None and manifest.encoder.get("encoder_id") != encoder_id:
        raise PreparedDataError(f"the prepared shards come from encoder "
                                f"{manifest.encoder.get('encoder_id')!r}, not {encoder_id!r}; "
                                "point data.prepared_dir at shards of this encoder or re-run prepare")
    if rank is not None:
        manifest.check_rank(rank)


class PreparedDataset(Dataset):
    """One split of a prepared folder at rank r.

    Items are dicts: `moments` (2*C_x, h, w), `semantic` (r, h, w) on the latent grid, `label` (),
    and `features` (D, gh, gw) float16 when stored and requested. In memory the whole split is
    also available as tensors: `.moments`, `.semantic`, `.labels`, `.features`.
    """

    def __init__(self, prepared_dir: str | Path, split: str, rank: int, whiten: bool = False,
                 with_features: bool = True, in_memory: Optional[bool] = None) -> None:
        self.root = Path(prepared_dir)
        self.manifest = read_manifest(self.root)
        check_manifest(self.manifest, rank=rank)
        if split not in self.manifest["splits"]:
            raise PreparedDataError(f"split {split!r} was not prepared in {self.root}; prepared: "
                                    f"{sorted(self.manifest['splits'])}")
        self.split, self.rank, self.whiten = split, rank, whiten
        info = self.manifest["splits"][split]
        self.shards = [self.root / name for name in info["shards"]]
        self.counts = list(info["counts"])
        self.offsets = [0]
        for count in self.counts:
            self.offsets.append(self.offsets[-1] + count)
        self.latent_grid = tuple(self.manifest["latent_grid"])
        self.with_features = with_features and bool(self.manifest["store_features"])
        eigenvalues = torch.tensor(self.manifest["pca"]["eigenvalues"][:rank], dtype=torch.float64)
        self.scale = (1.0 / eigenvalues.sqrt()).float() if whiten else None
        for shard in self.shards:
            if not shard.is_file():
                raise PreparedDataError(f"shard {shard} listed in the manifest is missing; re-run "
                                        "`bench prepare` (finished shards are kept)")
        if in_memory is None:
            in_memory = self._estimated_bytes() < 4 * 1024 ** 3
        self.in_memory = in_memory
        self._handles: dict[int, object] = {}
        if in_memory:
            self._load_all()

    def _estimated_bytes(self) -> int:
        return sum(shard.stat().st_size for shard in self.shards)

    def _semantic(self, coords: torch.Tensor) -> torch.Tensor:
        """(n, r_max, gh, gw) stored coords -> (n, r, h, w) on the latent grid, whitened if asked."""
        coords = coords[:, : self.rank].float()
        if self.scale is not None:
            coords = coords * self.scale.view(1, -1, 1, 1)
        if tuple(coords.shape[-2:]) != self.latent_grid:
            coords = F.interpolate(coords, size=self.latent_grid, mode="bilinear",
                                   align_corners=False)
        return coords.contiguous()

    def _load_all(self) -> None:
        from safetensors.torch import load_file

        parts: dict[str, list[torch.Tensor]] = {"moments": [], "semantic": [], "labels": [],
                                                "features": []}
        for shard in self.shards:
            tensors = self._checked(shard, load_file)
            parts["moments"].append(tensors["moments"])
            parts["semantic"].append(self._semantic(tensors["semantic"]))
            parts["labels"].append(tensors["labels"])
            if self.with_features:
                parts["features"].append(tensors["features"])
        self.moments = torch.cat(parts["moments"])
        self.semantic = torch.cat(parts["semantic"])
        self.labels = torch.cat(parts["labels"])
        self.features = torch.cat(parts["features"]) if self.with_features else None

    def _checked(self, shard: Path, load_file) -> dict:
        """A shard's tensors, or PreparedDataError naming the shard when it cannot be read or holds
        what a prepare never writes (labels out of range, non-finite values, wrong shapes)."""
        count = self.counts[self.shards.index(shard)]
        try:
            tensors = load_file(str(shard))
            problem = next((f"has no tensor {k!r}" for k in SHARD_KEYS if k not in tensors), None)
        except Exception as err:  # safetensors' SafetensorError, OSError: an unreadable file
            tensors, problem = {}, f"cannot be read ({type(err).__name__}: {err})"
        if problem is None:
            labels = tensors["labels"]
            num_classes = int(self.manifest["data"]["num_classes"])
            if any(tensors[k].shape[0] != count for k in SHARD_KEYS):
                problem = f"does not hold {count} rows as the manifest says"
            elif labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
                problem = f"holds labels outside [0, {num_classes})"
            else:
                bad = [k for k in ("moments", "semantic") if not bool(torch.isfinite(tensors[k]).all())]
                problem = f"holds NaN or infinite values in {bad[0]!r}" if bad else None
        if problem:
            raise PreparedDataError(f"prepared shard {shard} {problem}: it is damaged; rebuild it: "
                                    f"{rebuild_command(self.root)}")
        return tensors

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        import bisect

        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def __getitem__(self, index: int) -> dict:
        if self.in_memory:
            item = {"moments": self.moments[index], "semantic": self.semantic[index],
                    "label": self.labels[index]}
            if self.features is not None:
                item["features"] = self.features[index]
            return item
        from safetensors import safe_open

        shard, row = self._locate(int(index))
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.shards[shard]), framework="pt")
        handle = self._handles[shard]
        item = {"moments": handle.get_slice("moments")[row: row + 1][0],
                "semantic": self._semantic(handle.get_slice("semantic")[row: row + 1])[0],
                "label": handle.get_slice("labels")[row: row + 1][0]}
        if self.with_features:
            item["features"] = handle.get_slice("features")[row: row + 1][0]
        return item

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross process boundaries (DataLoader workers)
        return state


def load_prepared(prepared_dir: str | Path, split: str, rank: int, whiten: bool = False,
                  with_features: bool = True, in_memory: Optional[bool] = None) -> PreparedDataset:
    """Load one split of a finished prepare at PCA rank `rank` (<= r_max), optionally whitened.

    The dataset's `.manifest` says which encoder, grids, VAE and scaling factor produced it; call
    `check_manifest(ds.manifest, encoder_id=...)` to refuse shards of another encoder. Splits up to
    4 GB are loaded into memory (tensors `.moments`, `.semantic`, `.labels`, `.features`); larger
    ones are read item by item from the memory-mapped shards.
    """
    return PreparedDataset(prepared_dir, split, rank, whiten, with_features, in_memory)


def split_indices(manifest: Manifest, split: str) -> torch.Tensor:
    """(N,) int64: each row's image index in its split, in row order over the split's shards."""
    from safetensors import safe_open

    parts = []
    for name in manifest.splits[split]["shards"]:
        with safe_open(str(manifest.folder / name), framework="pt") as handle:
            parts.append(handle.get_tensor("indices").clone())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def check_same_images(manifest: Manifest, other: Manifest, split: str = "train") -> None:
    """PreparedDataError unless `other` holds the same images as `manifest` in the same row order,
    so that row i of one folder's features belongs to row i of the other's latents: the same
    dataset and image size, the same split sizes and, in `split`, the same image index row by row.
    Names every difference it found (a second folder for REPA's alignment targets)."""
    here, there = manifest.folder, other.folder
    problems = [f"data.{key} is {manifest.data.get(key)!r} in {here} but {other.data.get(key)!r} in {there}"
                for key in ("name", "image_size") if manifest.data.get(key) != other.data.get(key)]
    sizes = {s: int(e["count"]) for s, e in manifest.splits.items()}
    other_sizes = {s: int(e["count"]) for s, e in other.splits.items()}
    if sizes != other_sizes:
        problems.append(f"split sizes are {sizes} in {here} but {other_sizes} in {there}")
    elif split in sizes:
        rows, other_rows = split_indices(manifest, split), split_indices(other, split)
        differ = (rows != other_rows).nonzero().flatten()
        if len(differ):
            first = int(differ[0])
            problems.append(f"{len(differ)} {split} rows hold other images (first: row {first} is image "
                            f"{int(rows[first])} in {here} but {int(other_rows[first])} in {there})")
    if problems:
        raise PreparedDataError(
            f"{there} does not hold the same images in the same order as {here}: " + "; ".join(problems)
            + f". Prepare {there} from the same data (data.name, data.root, data.image_size) with the "
            "same prepare seed, so that its rows line up with the other folder's")


class FeatureRows:
    """The stored raw encoder features of one split, read by row: `rows(indices)` -> (n, D, gh, gw)
    float16. Only the `features` tensors are read (in memory up to 4 GB, else memory-mapped), for
    REPA targets taken from a second prepared folder (data.align_prepared_dir)."""

    def __init__(self, prepared_dir: str | Path, split: str, in_memory: Optional[bool] = None) -> None:
        self.manifest = read_manifest(prepared_dir)
        if not self.manifest.store_features:
            raise PreparedDataError(f"{prepared_dir} was prepared with encoder.store_features=false: it holds "
                                    "no raw features to align to; prepare it again with "
                                    "encoder.store_features=true")
        if split not in self.manifest.splits:
            raise PreparedDataError(f"split {split!r} was not prepared in {prepared_dir}; prepared: "
                                    f"{sorted(self.manifest.splits)}")
        self.shards = [Path(prepared_dir) / name for name in self.manifest.splits[split]["shards"]]
        self.offsets = [0]
        for count in self.manifest.splits[split]["counts"]:
            self.offsets.append(self.offsets[-1] + int(count))
        if in_memory is None:
            in_memory = sum(shard.stat().st_size for shard in self.shards) < 4 * 1024 ** 3
        self.features: Optional[torch.Tensor] = None
        self._handles: dict[int, object] = {}
        if in_memory:
            from safetensors import safe_open

            parts = []
            for shard, count in zip(self.shards, self.manifest.splits[split]["counts"]):
                with safe_open(str(shard), framework="pt") as handle:
                    if "features" not in handle.keys() or handle.get_slice("features").get_shape()[0] != count:
                        raise PreparedDataError(f"prepared shard {shard} has no {count} rows of features: "
                                                f"it is damaged; rebuild it: {rebuild_command(prepared_dir)}")
                    parts.append(handle.get_tensor("features"))
            self.features = torch.cat(parts)

    def __len__(self) -> int:
        return self.offsets[-1]

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            return self.features[indices]
        import bisect

        from safetensors import safe_open

        out = []
        for index in indices.tolist():
            shard = bisect.bisect_right(self.offsets, index) - 1
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(self.shards[shard]), framework="pt")
            row = index - self.offsets[shard]
            out.append(self._handles[shard].get_slice("features")[row: row + 1][0])
        return torch.stack(out)
