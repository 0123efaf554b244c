"""The joint objective both transports share (models/joint_objective.py): one validation of the
shared settings, the per-process modality drop of `batch_official`, and each spec's loss terms
switched on or off, with their weights, through the builders `bench train` uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench.compose import load_config
from bench.train.build import build_model, build_transport
from models.ddpm import DDPMConfig, DDPMTransport
from models.flow import FlowConfig, FlowTransport
from models.joint_objective import JointObjectiveConfig

SPECS = ["latent_only", "redi", "redi_rg", "redi_repa", "repa"]
TINY_MODEL = ["model.size=custom", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
              "model.patch_size=1", "objective.align_layer=1", "objective.projector_hidden=16"]
DDPM = ["objective.transport=ddpm", "eval.sampler=ddpm", "model.learn_sigma=true"]
MANIFEST = {"latent_grid": [4, 4], "latent_channels": 4, "encoder": {"channels": 8}}


def transport_of(kind: str, **kw):
    base = dict(num_classes=10, latent_channels=3, semantic_channels=2)
    return FlowTransport(FlowConfig(**base, **kw)) if kind == "flow" else DDPMTransport(DDPMConfig(**base, **kw))


def record_drops(transport) -> list[torch.Tensor]:
    """Wrap the transport's modality drop to record each step's keep mask (B,)."""
    seen, original = [], transport.objective.modality_drop

    def recording(z, drop_u):
        keep, clean = original(z, drop_u)
        seen.append(keep.clone())
        return keep, clean

    transport.objective.modality_drop = recording
    return seen


@pytest.mark.parametrize("config", [FlowConfig, DDPMConfig])
def test_shared_settings_are_validated_once_in_the_base_and_name_the_subclass(config):
    assert issubclass(config, JointObjectiveConfig)
    base = dict(num_classes=10, latent_channels=3, semantic_channels=2)
    for bad, key in [(dict(p_drop=1.5), "p_drop"), (dict(drop_mode="batch"), "drop_mode"),
                     (dict(lambda_z=float("inf")), "lambda_z"), (dict(drop_groups=0), "drop_groups"),
                     (dict(semantic_channels=0, p_drop=0.2), "p_drop")]:
        with pytest.raises(ValueError, match=rf"^{config.__name__}\.{key}"):
            config(**{**base, **bad})


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_batch_official_drops_each_process_block_on_its_own_first_uniform(kind):
    """drop_groups=2 (two DDP processes): rows [0, B/2) and [B/2, B) are each dropped all together,
    on the uniform drawn for their first row (rank r's own draw), independently of each other."""
    batch = 8
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(batch, 3, 2, 2, generator=g), torch.randn(batch, 2, 2, 2, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    transport = transport_of(kind, p_drop=0.5, drop_mode="batch_official", drop_groups=2,
                             **({"learn_sigma": False} if kind == "ddpm" else {}))
    seen = record_drops(transport)

    def model(x_t, t, y_in, z=None):  # a fixed prediction; only the drop pattern matters here
        return SimpleNamespace(x=0.5 * x_t, z=None if z is None else -z, aligned=None)

    combos = set()
    for seed in range(16):
        transport.training_losses(model, x, z, y, torch.Generator().manual_seed(seed))
        # Replay the documented draw order: t, eps_x, label uniforms, drop uniforms, eps_z.
        r = torch.Generator().manual_seed(seed)
        if kind == "flow":
            torch.rand(batch, generator=r)
        else:
            torch.randint(0, 1000, (batch,), generator=r)
        torch.randn(x.shape, generator=r), torch.rand(batch, generator=r)
        drop_u = torch.rand(batch, generator=r)
        expected = torch.tensor([bool(drop_u[0] >= 0.5)] * 4 + [bool(drop_u[4] >= 0.5)] * 4)
        assert torch.equal(seen[-1], expected), seed
        combos.add((bool(expected[0]), bool(expected[4])))
    assert combos == {(True, True), (True, False), (False, True), (False, False)}  # independent blocks
    with pytest.raises(ValueError, match="drop_groups"):  # 8 rows do not split into 3 processes
        transport_of(kind, p_drop=0.5, drop_mode="batch_official", drop_groups=3).training_losses(
            model, x, z, y, torch.Generator())


def test_one_process_batch_official_is_the_whole_batch_as_before():
    transport = transport_of("flow", p_drop=0.5, drop_mode="batch_official")
    seen = record_drops(transport)
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(8, 3, 2, 2, generator=g), torch.randn(8, 2, 2, 2, generator=g)
    y = torch.zeros(8, dtype=torch.long)
    for seed in range(8):
        transport.training_losses(lambda x_t, t, y_in, z=None: SimpleNamespace(x=x_t, z=z, aligned=None),
                                  x, z, y, torch.Generator().manual_seed(seed))
    assert all(bool(keep.all()) or not bool(keep.any()) for keep in seen)
    assert {bool(keep[0]) for keep in seen} == {True, False}


@pytest.mark.parametrize("transport", ["flow", "ddpm"])
@pytest.mark.parametrize("spec", SPECS)
def test_each_spec_switches_its_terms_on_and_off_with_its_weights(spec, transport):
    """Beyond which terms are logged: the built objective carries the spec's settings, the modality
    drop happens exactly for redi_rg, and `loss` is exactly the spec's weighted sum of the terms."""
    cfg = load_config([f"spec={spec}", *TINY_MODEL, *(DDPM if transport == "ddpm" else [])])
    torch.manual_seed(0)
    model, objective = build_model(cfg, MANIFEST), build_transport(cfg, MANIFEST)
    settings = objective.config
    semantic, repa, rg = spec.startswith("redi"), spec.endswith("repa"), spec == "redi_rg"
    assert (settings.semantic_channels > 0, settings.lambda_repa, settings.p_drop) == \
        (semantic, 0.5 if repa else 0.0, 0.2 if rg else 0.0)
    assert settings.lambda_z == 1.0 and settings.class_dropout_prob == 0.1 and settings.drop_mode == "sample"
    seen = record_drops(objective)

    batch = 64  # p_drop = 0.2: all 64 kept has probability 0.8^64 ~ 6e-7 (and the seed is fixed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 4, 4, generator=g)
    z = torch.randn(batch, cfg.semantic_channels, 4, 4, generator=g) if semantic else None
    target = torch.randn(batch, 16, 8, generator=g)
    losses = objective.training_losses(model, x, z, torch.arange(batch) % 10, g, align_target=target)

    expected = losses["loss/latent"] + losses.get("loss/vlb", 0.0) + settings.lambda_repa * losses.get("loss/repa", 0.0)
    if semantic:
        kept = seen[0]
        assert bool((~kept).any()) == rg and bool(kept.any())
        # loss/semantic is the mean over kept samples; the loss averages it over the whole batch.
        expected = expected + settings.lambda_z * losses["loss/semantic"] * kept.sum() / batch
    else:
        assert seen == []
    # float32 sums of the same terms in another order: agreement to a few ulp of values ~ 1-10.
    torch.testing.assert_close(losses["loss"].detach(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key, values", [
    ("lambda_z", [0.0, 2.5, -0.1, float("nan"), float("inf")]),
    ("lambda_repa", [0.0, 0.5, -1.0, float("nan")]),
    ("p_drop", [0.0, 0.2, -0.01, 1.01, float("nan")]),
    ("drop_mode", ["sample", "batch_official", "batch", "per_sample"]),
])
def test_load_time_rules_of_bench_config_equal_the_cores(key, values):
    """bench/config.py checks the objective's fields at load time (user's key names, no torch);
    the core validates them once for both transports. Both accept exactly the same values."""
    from bench.config import ConfigError, ObjectiveConfig
    for value in values:
        try:
            ObjectiveConfig(**{key: value})
            bench_ok = True
        except ConfigError:
            bench_ok = False
        try:
            JointObjectiveConfig(num_classes=10, latent_channels=4, semantic_channels=8, **{key: value})
            core_ok = True
        except ValueError:
            core_ok = False
        assert bench_ok == core_ok, (key, value)


def test_p_drop_one_is_refused_for_a_run_but_not_by_the_core():
    """The one deliberate difference: p_drop=1 drops every semantic input, so a run would never train
    the semantic head (bench/config.py refuses it with that reason); the core still computes it (the
    mask arithmetic is well defined, and tests of the drop use it)."""
    from bench.config import ConfigError, ObjectiveConfig

    with pytest.raises(ConfigError, match="p_drop"):
        ObjectiveConfig(p_drop=1.0)
    JointObjectiveConfig(num_classes=10, latent_channels=4, semantic_channels=8, p_drop=1.0)
