"""How far bf16 autocast moves prepare's EfficientNet-Lite0 features and their PCA coordinates:
the first N Fashion-MNIST train images encoded as pass 1 encodes them (128 px, batch 16), once in
fp32 and once under bf16 autocast, then projected with a prepared folder's PCA.

    PYTHONPATH=$PWD python results/studies/embedded/precision/feature_error.py \
        [--prepared results/prepared] [--images 512]

Writes feature_error.json (relative Frobenius errors, the machine, commit and date) and prints it.
"""

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.config import DataConfig
from bench.demo.output import machine
from bench.perf.timing import git_commit
from bench.prepare.encoders import build_efficientnet_lite0
from bench.prepare.pca import PCAModel
from bench.prepare.sources import open_split

HERE = Path(__file__).resolve().parent


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def features(encoder, images: torch.Tensor, dtype) -> torch.Tensor:
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        return torch.cat([encoder.encode(images[i:i + 16]) for i in range(0, len(images), 16)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="results/prepared", help="a prepared folder of the embedded default")
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder = build_efficientnet_lite0(32)
    pca = PCAModel.load(Path(args.prepared) / "pca.safetensors", encoder.info.encoder_id, encoder.info.channels)
    images = open_split(DataConfig(name="fashion_mnist"), "train").images(range(args.images))
    fp32, bf16 = features(encoder, images, None), features(encoder, images, torch.bfloat16)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "machine": machine(), "images": args.images, "encoder": encoder.info.encoder_id,
              "features_relative_error": relative(bf16, fp32),
              "pca_relative_error_by_rank": {r: relative(pca.project_map(bf16, r), pca.project_map(fp32, r))
                                             for r in (2, 4, 8, 16)}}
    (HERE / "feature_error.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
