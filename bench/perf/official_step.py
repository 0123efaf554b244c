"""`bench perf --official PATH`: the official ReDi training step, timed beside the default step.

PATH is the user's own checkout of https://github.com/zelaki/ReDi (nothing of it is copied into
this repository). Its step is built as its `train_redi.py` builds it, minus the data loader and the
online DINOv2 (both sides read the same precomputed batches, so the ratio compares the steps):

    model = SiT(input_size=h, patch_size=p, in_channels=4 + r, hidden_size, depth, num_heads,
                num_classes, learn_sigma=False)         # models.py: checkpointing on every block
    ema = deepcopy(model); opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    transport = create_transport("Linear", "velocity", None, None, None)
    step: x = sample_posterior(moments); loss = transport.training_losses(model, cat[x, z],
          dict(y=y), dino_drop_prob=p_drop)["loss"].mean(); opt.zero_grad(); loss.backward();
          opt.step(); update_ema(ema, model) (its loop over named parameters); loss.item()

The two workloads are timed round-robin in the same run (bench/perf/timing.py), so a speed-up is
always a ratio of two measurements on one machine under the same load.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.config import ExperimentConfig
from bench.perf.roofline import train_flops_per_image
from bench.perf.setup import BatchPool, Geometry, PerfError
from bench.perf.timing import Workload
from bench.train.build import backbone_settings, build_model
from models.official_checkpoint import import_official_state_dict

# The official code's literal choices (train_redi.py): AdamW(lr=1e-4, weight_decay=0), EMA decay 0.9999.
OFFICIAL_LR, OFFICIAL_EMA_DECAY = 1e-4, 0.9999
# fp32 forward of the same network on the same inputs: measured <= 3e-7 relative (tiny and S/2).
OFFICIAL_LOSS_RTOL = 1e-5


@dataclass(frozen=True)
class OfficialCode:
    """The two modules of the official checkout the training step uses."""

    path: Path
    models: types.ModuleType
    transport: types.ModuleType
    commit: str | None = None
    """HEAD of the checkout when it is a git clone (recorded in the rows)."""


def _git_head(root: Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _import(name: str, file: Path, package_dir: Path | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_official_code(path: str | Path) -> OfficialCode:
    """Import `models.py` and the `transport` package of an official checkout under private names
    (they would otherwise shadow this project's `models`). One clear error when PATH is not one."""
    root = Path(path).expanduser()
    missing = [name for name in ("models.py", "transport/__init__.py") if not (root / name).is_file()]
    if missing:
        raise PerfError(f"--official {path}: not a checkout of the official ReDi code (no "
                        f"{' or '.join(missing)} there); clone https://github.com/zelaki/ReDi and pass "
                        "its folder")
    stubbed = False
    if importlib.util.find_spec("torchdiffeq") is None:
        # transport/integrators.py imports torchdiffeq for its ODE sampler; the training step never
        # integrates, so a stand-in that refuses to be called is enough to import it.
        stub = types.ModuleType("torchdiffeq")

        def odeint(*args, **kwargs):
            raise RuntimeError("torchdiffeq is not installed (bench perf --official imported a stand-in)")

        stub.odeint = odeint
        sys.modules["torchdiffeq"], stubbed = stub, True
    try:
        models = _import("redi_official_models", root / "models.py")
        transport = _import("redi_official_transport", root / "transport" / "__init__.py", root / "transport")
    except Exception as err:  # noqa: BLE001 - any import failure of foreign code is one clear error
        raise PerfError(f"--official {path}: importing the official models.py / transport failed "
                        f"({type(err).__name__}: {err}); it needs timm and numpy") from None
    finally:
        if stubbed:
            sys.modules.pop("torchdiffeq", None)
    for name in ("SiT",):
        if not hasattr(models, name):
            raise PerfError(f"--official {path}: models.py has no {name}; is this the ReDi checkout?")
    if not hasattr(transport, "create_transport"):
        raise PerfError(f"--official {path}: transport has no create_transport; is this the ReDi checkout?")
    return OfficialCode(root, models, transport, _git_head(root))


def check_official_spec(cfg: ExperimentConfig) -> None:
    """The official step exists for merged ReDi without REPA (what train_redi.py trains by default)."""
    if cfg.model.fusion != "merged" or cfg.objective.lambda_repa > 0 or cfg.model.learn_sigma:
        raise PerfError(f"--official: spec {cfg.spec!r} has no official counterpart to time; the "
                        "official train_redi.py trains merged ReDi tokens without REPA (--reference-spec redi)")


def build_official_model(code: OfficialCode, cfg: ExperimentConfig, geometry: Geometry) -> torch.nn.Module:
    """The official SiT as train_redi.py builds it for this config's shapes."""

    shape = backbone_settings(cfg, geometry.manifest())  # registry sizes (S/2) resolved as bench train does
    return code.models.SiT(input_size=shape.input_size, patch_size=shape.patch_size,
                           in_channels=shape.latent_channels + shape.semantic_channels,
                           hidden_size=shape.hidden_size, depth=shape.depth, num_heads=shape.num_heads,
                           mlp_ratio=shape.mlp_ratio, num_classes=shape.num_classes, learn_sigma=False)


def build_official_workload(code: OfficialCode, cfg: ExperimentConfig, geometry: Geometry, pool: BatchPool,
                            device: torch.device, seed: int = 0) -> Workload:
    """A Workload whose run() is one step of the official training loop (module docstring)."""
    check_official_spec(cfg)
    torch.manual_seed(seed)
    model = build_official_model(code, cfg, geometry).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    transport = code.transport.create_transport("Linear", "velocity", None, None, None)
    opt = torch.optim.AdamW(model.parameters(), lr=OFFICIAL_LR, weight_decay=0)
    rank, scale = cfg.semantic_channels, geometry.scaling_factor
    losses: list[float] = []

    @torch.no_grad()
    def update_ema() -> None:  # the official update_ema: every named parameter, pos_embed included
        with torch.profiler.record_function("ema"):  # names the region for bench perf --profile
            ema_params = OrderedDict(ema.named_parameters())
            for name, param in model.named_parameters():
                ema_params[name].mul_(OFFICIAL_EMA_DECAY).add_(param.data, alpha=1 - OFFICIAL_EMA_DECAY)

    def step() -> None:
        batch = pool.next()
        with torch.no_grad():  # the official sample_posterior
            mean, std = torch.chunk(batch["moments"], 2, dim=1)
            x = (mean + std * torch.randn_like(mean)) * scale
        x_joint = torch.cat([x, batch["semantic"][:, :rank]], dim=1)
        loss = transport.training_losses(model, x_joint, dict(y=batch["labels"]),
                                         dino_drop_prob=cfg.objective.p_drop)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema()
        losses.append(loss.item())  # the official loop's running_loss += loss.item()


    batch_size = pool.batches[0]["moments"].shape[0]
    # the same network arithmetic as redi-bench's merged model of this config
    shape = backbone_settings(cfg, geometry.manifest())
    flops = train_flops_per_image(shape)
    fields = {"train_flops_per_image": flops, "mode": "official", "precision": "fp32", "dtype": "fp32",
              "activation_checkpointing": True,
              "optimizer": "adamw-default", "ema": "python-loop", "compile": False, "nan_guard": False,
              "semantic_features": "precomputed", "online_encoder": None, "step_function": "official",
              "official_path": str(code.path), "official_commit": code.commit, "fusion": "merged",
              "semantic_channels": rank,
              "lambda_repa": 0.0, "tokens": shape.num_patches,
              "parameters": sum(p.numel() for p in model.parameters()), "batch": batch_size,
              "activation_memory_mb": None, "state_memory_mb": None, "official_losses": losses}
    return Workload(kind="train", name="official", run=step, images_per_call=batch_size, fields=fields,
                    device=device)


def official_loss_agreement(code: OfficialCode, cfg: ExperimentConfig, geometry: Geometry,
                            device: torch.device, seed: int = 0) -> dict:
    """Same weights, same (x_t, t, y, target): the official network's velocity loss (its
    transport's formula, latent + semantic term) against redi-bench's network's, in fp32.

    The official weights get a random perturbation first (adaLN-Zero and the zero heads would
    otherwise give a zero prediction, and any two networks would agree)."""

    check_official_spec(cfg)
    torch.manual_seed(seed)
    official = build_official_model(code, cfg, geometry)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours = build_model(cfg, geometry.manifest())
    ours.load_state_dict(import_official_state_dict(official.state_dict(), ours.config))
    official, ours = official.to(device).eval(), ours.to(device).eval()  # eval: no label dropout
    batch, c_x, h = 8, geometry.latent_channels, geometry.latent_grid
    x_t = torch.randn(batch, c_x + cfg.semantic_channels, h, h, generator=g).to(device)
    u_t = torch.randn(x_t.shape, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, geometry.num_classes, (batch,), generator=g).to(device)

    def loss(v: torch.Tensor) -> float:  # official transport: mean_flat per modality, lam = 1
        sq = (v - u_t) ** 2
        return float((sq[:, :c_x].mean(dim=(1, 2, 3)) + sq[:, c_x:].mean(dim=(1, 2, 3))).mean())

    with torch.no_grad():
        official_loss = loss(official(x_t, t, y))
        out = ours(x_t[:, :c_x], t, y, x_t[:, c_x:])
        ours_loss = loss(torch.cat([out.x, out.z], dim=1))
    rel = abs(ours_loss - official_loss) / abs(official_loss)
    return {"spec": cfg.spec, "official": official_loss, "default": ours_loss, "rel_err": rel,
            "rtol": OFFICIAL_LOSS_RTOL, "ok": rel <= OFFICIAL_LOSS_RTOL}
