"""What bf16 saves in `bench prepare`'s units of work at the embedded default, fp32 and bf16 autocast
timed in paired rounds (one round = each unit once in each precision, so load lands on both):

- the embedded VAE's training step (batch 32, bench.prepare.embedded.vae_losses + AdamW);
- the VAE's encoder and EfficientNet-Lite0 at prepare's encoder batch (16), as pass 1 runs them;
- the evaluation classifier's training step (batch 128), which prepare keeps in fp32: its row says
  what that choice costs.

    PYTHONPATH=$PWD python results/studies/embedded/precision/prepare_speed.py [--rounds 15] [--out NAME]

One compute thread (a prepare lane's). Writes prepare_speed.json, or NAME in this folder for
another machine's record (medians, every round, machine,
load, commit, date) and prints the table README.md shows. Random images and weights: the cost
depends on shapes, not values.
"""

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.demo.output import machine
from bench.perf.timing import git_commit
from bench.prepare import embedded
from bench.prepare.encoders import LatentVAE, build_efficientnet_lite0

HERE = Path(__file__).resolve().parent


def units(generator: torch.Generator) -> dict:
    """name -> run(autocast dtype or None), each one unit of prepare's work."""
    images = torch.randint(0, 256, (128, 3, 32, 32), generator=generator, dtype=torch.uint8)
    vae_settings, cls_settings = embedded.EmbeddedVAESettings(), embedded.ClassifierSettings()
    trained = {}
    for dtype in (None, torch.bfloat16):  # one network per precision: their weights drift apart
        vae = embedded.build_embedded_vae(vae_settings, 32)
        classifier = embedded.EvalClassifier(10, cls_settings.width, cls_settings.feature_dim).to(
            memory_format=torch.channels_last)
        trained[dtype] = (vae, torch.optim.AdamW(vae.parameters()), classifier,
                          torch.optim.AdamW(classifier.parameters()))
    frozen_vae = LatentVAE(embedded.build_embedded_vae(vae_settings, 32), "embedded", "-", 1.0)
    encoder = build_efficientnet_lite0(32)
    labels = torch.randint(0, 10, (128,), generator=generator)

    def vae_step(dtype):
        vae, optimizer, _, _ = trained[dtype]
        mse, kl = embedded.vae_losses(vae, embedded.to_unit_range(images[:32]), generator, dtype)
        optimizer.zero_grad(set_to_none=True)
        (mse + vae_settings.kl_weight * kl).backward()
        optimizer.step()

    def classifier_step(dtype):
        _, _, classifier, optimizer = trained[dtype]
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(classifier.logits(images.contiguous(memory_format=torch.channels_last)).float(),
                                   labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def frozen(network):
        def run(dtype):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                network(images[:16])
        return run

    return {"vae training step (batch 32)": vae_step, "vae encode (batch 16)": frozen(frozen_vae.encode_moments),
            "efficientnet_lite0 features (batch 16)": frozen(encoder.encode),
            "classifier training step (batch 128; prepare keeps fp32)": classifier_step}


def measure(rounds: int) -> dict:
    torch.set_num_threads(1)
    runs = units(torch.Generator().manual_seed(0))
    precisions = {"fp32": None, "bf16": torch.bfloat16}
    seconds = {name: {p: [] for p in precisions} for name in runs}
    for run in runs.values():
        for dtype in precisions.values():  # warm-up
            run(dtype)
    for _ in range(rounds):
        for name, run in runs.items():
            for precision, dtype in precisions.items():
                start = time.perf_counter()
                run(dtype)
                seconds[name][precision].append(time.perf_counter() - start)
    return {name: {"fp32_ms": 1e3 * statistics.median(s["fp32"]), "bf16_ms": 1e3 * statistics.median(s["bf16"]),
                   "bf16_over_fp32": statistics.median(b / a for a, b in zip(s["fp32"], s["bf16"])),
                   "seconds": s} for name, s in seconds.items()}


def table(record: dict) -> str:
    lines = ["| unit | fp32, ms | bf16, ms | bf16 / fp32 (median of per-round ratios) |", "|---|---|---|---|"]
    for name, m in record["units"].items():
        lines.append(f"| {name} | {m['fp32_ms']:.1f} | {m['bf16_ms']:.1f} | {m['bf16_over_fp32']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="prepare_speed.json", help="file name in this folder")
    args = parser.parse_args()
    load_before = list(os.getloadavg())
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "machine": machine(), "threads": 1, "rounds": args.rounds, "load_before": load_before}
    record["units"] = measure(args.rounds)
    record["load_after"] = list(os.getloadavg())
    (HERE / args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
