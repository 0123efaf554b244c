"""Typed configs, Hydra composition, run identity and the CLI front door."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compose import available, dumps, from_dict, load_config, to_dict
from bench.config import ConfigError, ExperimentConfig
from bench.run_hash import run_dir, run_hash

REPO = Path(__file__).resolve().parents[1]
SPECS = ["latent_only", "redi", "redi_repa", "redi_rg", "repa"]


def test_specs_are_the_ones_documented():
    assert available("spec") == SPECS
    assert available("scale") == ["embedded", "paper"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("scale", ["embedded", "paper"])
def test_every_spec_composes_at_every_scale(spec, scale):
    cfg = load_config([f"spec={spec}", f"scale={scale}"])
    assert isinstance(cfg, ExperimentConfig) and cfg.spec == spec
    # Loss terms are switched on and off by the spec only (DESIGN: an ablation switches terms).
    assert (cfg.semantic_channels > 0) == spec.startswith("redi")
    assert (cfg.objective.lambda_repa > 0) == spec.endswith("repa")
    assert (cfg.objective.p_drop > 0) == (spec == "redi_rg")


def test_paper_scale_follows_table8_and_section4():
    cfg = load_config(["spec=redi", "scale=paper"])
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (1e-4, 0.9, 0.999, 0.0)
    assert (cfg.train.batch_size, cfg.train.ema_decay, cfg.train.max_steps) == (256, 0.9999, 400_000)
    assert (cfg.model.size, cfg.model.pca_rank, cfg.objective.lambda_z) == ("XL/2", 8, 1.0)
    assert (cfg.eval.sampler, cfg.eval.num_sampling_steps, cfg.eval.num_samples) == ("sde", 250, 50_000)
    # the official code trains in fp32 with TF32; bf16 is an opt-in (bench report marks it)
    assert cfg.train.precision == "fp32"
    assert (cfg.encoder.pca_fit_images, cfg.encoder.pca_fit_subset) == (76_800, "random")  # paper 4.1


def test_embedded_scale_trains_and_samples_in_bf16_where_native_and_the_paper_scale_in_fp32():
    embedded, paper = load_config(["scale=embedded"]), load_config(["scale=paper"])
    assert (embedded.train.precision, embedded.eval.precision) == ("auto", "auto")
    assert paper.eval.precision == "fp32"  # the official sample.py runs fp32
    with pytest.raises(ConfigError, match="eval.precision"):
        load_config(["eval.precision=fp16"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["spec=nope"], "Available specs"),
        (["model.nope=1"], "model.nope is not a setting"),
        (["objective.p_drop=-0.1"], "objective.p_drop"),
        (["optim.lr=-1"], "optim.lr"),
        (["model.fusion=concat"], "model.fusion"),
        (["model.pca_rank=64"], "encoder.pca_rank_max"),
        (["spec=latent_only", "objective.p_drop=0.2"], "model.fusion=none"),
        (["spec=latent_only", "eval.guidance.rg_scale=1.5"], "Representation Guidance"),
        (["eval.guidance.cfg_scale=-1"], "guidance.cfg_scale"),
        (["objective.transport=ddpm"], "eval.sampler"),
        (["model.depth=abc"], "model.depth"),
        (["model.class_dropout_prob=1.0"], "model.class_dropout_prob=1.0 is out of range"),
        (["model.class_dropout_prob=-0.1"], "model.class_dropout_prob"),
        (["model.pca_rank=0"], "model.pca_rank=0"),  # a fusion with no semantic channels
        (["model.size=XXL/2"], "model.size='XXL/2'"),
        (["model.size=XL/3"], "model.size='XL/3'"),
        (["encoder.variant=vitz14"], "encoder.variant='vitz14'"),
        (["optim.beta1=1.0"], "optim.beta1"),
        (["optim.beta2=1.5"], "optim.beta2"),
        (["optim.lr=nan"], "optim.lr=nan"),
        (["objective.lambda_z=inf"], "objective.lambda_z=inf"),
        (["train.ema_decay=1.5"], "train.ema_decay"),
        (["train.ema_decay=1.0"], "never moves the EMA"),
        (["spec=redi_rg", "objective.p_drop=1.0"], "semantic head is never trained"),
    ],
)
def test_bad_configs_fail_at_load_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert fragment in str(err.value)


def test_run_hash_ignores_logging_paths_and_eval_but_not_results():
    base = load_config(["spec=redi"])
    same = load_config(["spec=redi", "train.log_every=3", "train.ckpt_every=7", "output_root=/elsewhere",
                        "eval.num_samples=10", "grid=other"])
    assert run_hash(base) == run_hash(same)
    for change in ["train.seed=1", "model.pca_rank=4", "objective.lambda_z=0.5", "optim.lr=1e-3"]:
        assert run_hash(load_config(["spec=redi", change])) != run_hash(base), change
    assert run_dir(base).parts[-2:] == ("adhoc", f"redi-{run_hash(base)}")


def test_override_order_does_not_change_identity():
    a = load_config(["spec=redi", "model.pca_rank=4", "train.seed=3"])
    b = load_config(["train.seed=3", "spec=redi", "model.pca_rank=4"])
    assert run_hash(a) == run_hash(b)


def test_saved_config_round_trips():
    cfg = load_config(["spec=redi_repa", "eval.steps=[10,20]"])
    rebuilt = from_dict(json.loads(dumps(cfg)))
    assert rebuilt == cfg and to_dict(rebuilt) == to_dict(cfg)
    with pytest.raises(ConfigError):
        from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "fusion": "sideways"}})


@pytest.mark.parametrize("module", ["bench.cli", "bench"])  # `python -m bench` is the same command
def test_cli_help_lists_every_design_subcommand(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ["prepare", "train", "grid", "status", "sample", "eval", "report", "perf", "weights", "demo"]:
        assert f"\n    {name}" in out.stdout


def test_cli_unknown_subcommand_is_one_clear_error():
    out = subprocess.run([sys.executable, "-m", "bench.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown subcommand" in out.stderr and "Traceback" not in out.stderr


def test_messages_name_the_allowed_values():
    with pytest.raises(ConfigError, match=r"model.fusion='concat' is not allowed; choose one of "
                                          r"\['none', 'merged', 'separate'\]"):
        load_config(["model.fusion=concat"])
    with pytest.raises(ConfigError, match=r"must be finite and lie in \[0.0, 1.0\)"):
        load_config(["model.class_dropout_prob=1.0"])
    with pytest.raises(ConfigError, match=r"size in \['S', 'B', 'L', 'XL'\] and patch in \[1, 2, 4, 8\]"):
        load_config(["model.size=B/3"])


def test_every_size_the_config_accepts_is_one_the_backbone_builds():
    """Both read models.settings: each registry name with each prefix loads and builds a config."""
    from models.backbone import backbone_config
    from models.settings import MODEL_SIZES, PATCH_SIZES

    for size in MODEL_SIZES:
        for patch in PATCH_SIZES:
            for prefix in ("", "SiT-", "DiT-"):
                name = f"{prefix}{size}/{patch}"
                assert load_config([f"model.size={name}"]).model.size == name
                backbone_config(name, input_size=32, latent_channels=4)  # builds the config only
    with pytest.raises(ValueError, match="unknown model"):
        backbone_config("XL/3", input_size=32, latent_channels=4)


def test_loading_a_config_imports_no_torch():
    """`bench status`, `bench grid --dry-run` and Hydra composition load configs: no torch for that."""
    code = ("import sys, bench.config, bench.compose; bench.compose.load_config(['spec=redi_rg']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=120).stdout
    assert out.strip() == "[]"


def test_class_dropout_just_below_one_is_accepted():
    assert load_config(["model.class_dropout_prob=0.99"]).model.class_dropout_prob == 0.99


TINY_MODEL = ["model.size=custom", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
              "model.patch_size=1", "objective.align_layer=1", "objective.projector_hidden=16"]
DDPM = ["objective.transport=ddpm", "eval.sampler=ddpm", "model.learn_sigma=true"]


@pytest.mark.parametrize("transport", ["flow", "ddpm"])
@pytest.mark.parametrize("spec", SPECS)
def test_each_spec_trains_exactly_its_loss_terms(spec, transport):
    """The loss terms of a composed spec, through the same builders as `bench train`
    (bench.train.build), are present or absent exactly as the spec says, for both transports."""
    import torch

    from bench.train.build import build_model, build_transport

    cfg = load_config([f"spec={spec}", *TINY_MODEL, *(DDPM if transport == "ddpm" else [])])
    manifest = {"latent_grid": [4, 4], "latent_channels": 4, "encoder": {"channels": 8}}
    torch.manual_seed(0)
    model, objective = build_model(cfg, manifest), build_transport(cfg, manifest)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 4, 4, generator=g)
    z = torch.randn(6, cfg.semantic_channels, 4, 4, generator=g) if cfg.semantic_channels else None
    target = torch.randn(6, 16, 8, generator=g)  # encoder features on the 4x4 token grid
    losses = objective.training_losses(model, x, z, torch.arange(6) % 10, g, align_target=target)
    expected = {"loss", "loss/latent"}
    expected |= {"loss/semantic"} if spec.startswith("redi") else set()
    expected |= {"loss/repa"} if spec.endswith("repa") else set()
    expected |= {"loss/vlb"} if transport == "ddpm" else set()
    assert set(losses) == expected
    assert (model.projector is not None) == spec.endswith("repa")
    assert (model.z_embedder is not None) == spec.startswith("redi")
    assert all(bool(torch.isfinite(v)) for v in losses.values())


def test_eval_feature_network_and_fd_dinov2_variants_are_checked_at_load():
    with pytest.raises(ConfigError, match="eval.feature_network"):
        load_config(["eval.feature_network=clip"])
    with pytest.raises(ConfigError, match="eval.dinov2_variant"):
        load_config(["eval.dinov2_variant=vitb14_reg"])


@pytest.mark.parametrize("override", ["model.grad_checkpointing=true", "encoder.pca_rank_max=32",
                                      "encoder.store_features=false", "train.log_every=7"])
def test_settings_that_leave_the_numbers_alone_keep_the_run_folder(override):
    assert run_hash(load_config([override])) == run_hash(load_config([]))


@pytest.mark.parametrize("override", ["model.pca_rank=4", "encoder.online_features=true", "train.seed=1"])
def test_settings_that_change_the_numbers_change_the_run_folder(override):
    assert run_hash(load_config([override])) != run_hash(load_config([]))


@pytest.mark.parametrize("override", ["+model.typo_key=3", "++model.typo_key=3", "model.typo_key=3"])
def test_keys_cannot_be_appended_and_the_error_lists_the_section(override):
    """Hydra's `+` would add a key nothing reads (same run, same hash); its own error recommends it."""
    with pytest.raises(ConfigError) as err:
        load_config(["spec=redi", override])
    message = str(err.value)
    assert message.startswith("model.typo_key is not a setting")
    for key in ("size", "fusion", "pca_rank", "class_dropout_prob"):
        assert f"'{key}'" in message
    assert "+" not in message  # never recommended as the fix
    with pytest.raises(ConfigError, match=r"eval.guidance.nope is not a setting: eval.guidance has the keys"):
        load_config(["+eval.guidance.nope=1"])
    with pytest.raises(ConfigError, match="the top level has the keys"):
        load_config(["+typo=1"])


def test_config_file_errors_are_one_line_naming_the_file_and_key(tmp_path):
    from bench.compose import load_config_file

    good = to_dict(load_config(["spec=redi"]))
    assert load_config_file(_write(tmp_path / "ok.json", json.dumps(good))) == load_config(["spec=redi"])
    cases = {
        "bad_value.json": (json.dumps({**good, "model": {**good["model"], "depth": "abc"}}), "model.depth"),
        "bad_choice.json": (json.dumps({**good, "model": {**good["model"], "fusion": "x"}}), "model.fusion='x'"),
        "typo.json": (json.dumps({**good, "train": {**good["train"], "typo": 1}}), "train.typo is not a setting"),
        "broken.json": ('{"model": {', "not valid JSON (line 1, column 12"),
    }
    for name, (text, fragment) in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config_file(_write(tmp_path / name, text))
        message = str(err.value)
        assert message.startswith(f"--config {tmp_path / name}: ") and fragment in message, message
        assert "\n" not in message
    # through the CLI: one line on stderr, exit 2, no traceback
    out = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--config", str(tmp_path / "broken.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == f"bench train: error: --config {tmp_path / 'broken.json'}: not valid JSON " \
                                 "(line 1, column 12: Expecting property name enclosed in double quotes)"


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("override, fragment", [
    ("output_root=/dev/null/runs", "output_root=/dev/null/runs: /dev/null is not a folder"),
    ("output_root=", "output_root is empty"),
])
def test_train_refuses_odd_output_roots_in_one_line(tmp_path, override, fragment):
    """Before any training, one line; an empty root would write ./adhoc/ here."""
    out = subprocess.run([sys.executable, "-m", "bench.cli", "train", "train.max_steps=1", override],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
