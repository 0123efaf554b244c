"""Paired seeds as common random numbers: seed k of every spec sees the same data order, VAE
posterior noise, diffusion times and latent noise during training, and the same labels and initial
sampling noise at evaluation; another seed sees other draws. And the grid schema that asks for it
(`seeds: {paired: [...]}`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_train import one_thread, prepared_dir, tiny_config  # noqa: F401

from bench.launch.grids import GridError, expand, load_grid
from bench.train import loop


class _Spy:
    """Wraps the transport the loop builds; records what the objective received and what it fed the
    network (x_t, t, the label after CFG dropout) on every step."""

    def __init__(self, transport, calls: list) -> None:
        self.transport, self.calls = transport, calls

    def __getattr__(self, name):
        return getattr(self.transport, name)

    def training_losses(self, model, x, z, y, generator, **kwargs):
        record = {"x": x.clone(), "y": y.clone(), "z": None if z is None else z.clone()}

        def network(x_t, t, y_in, z=None):
            record.update(x_t=x_t.detach().clone(), t=t.detach().clone(), y_in=y_in.clone())
            return model(x_t, t, y_in, z=z)

        self.calls.append(record)
        return self.transport.training_losses(network, x, z, y, generator, **kwargs)


def _draws(spec: str, seed: int, prepared: Path, out: Path, monkeypatch, *extra: str) -> list[dict]:
    calls: list[dict] = []
    build = loop.build_transport
    monkeypatch.setattr(loop, "build_transport", lambda cfg, manifest, **kw: _Spy(build(cfg, manifest, **kw), calls))
    cfg = tiny_config(prepared, out / f"{spec}-{seed}", f"train.seed={seed}", "train.max_steps=3",
                      "model.class_dropout_prob=0.5", *extra, spec=spec)
    loop.train(cfg)
    assert len(calls) == 3
    return calls


@pytest.mark.parametrize("other", ["redi", "repa", "redi_rg", "redi_repa"])
def test_same_seed_gives_every_spec_the_same_data_times_and_latent_noise(other, prepared_dir, tmp_path,
                                                                         monkeypatch):
    base = _draws("latent_only", 0, prepared_dir, tmp_path, monkeypatch)
    paired = _draws(other, 0, prepared_dir, tmp_path, monkeypatch)
    for a, b in zip(base, paired):
        assert torch.equal(a["y"], b["y"])      # data order: the same items, labels ...
        assert torch.equal(a["x"], b["x"])      # ... and the same VAE posterior noise on them
        assert torch.equal(a["t"], b["t"])      # the same diffusion times
        assert torch.equal(a["x_t"], b["x_t"])  # x_t = (1 - t) x + t eps_x: the same latent noise


def test_specs_with_the_same_semantic_channels_share_label_dropout_and_semantic_noise(prepared_dir, tmp_path,
                                                                                     monkeypatch):
    redi = _draws("redi", 0, prepared_dir, tmp_path, monkeypatch)
    redi_repa = _draws("redi_repa", 0, prepared_dir, tmp_path, monkeypatch)
    for a, b in zip(redi, redi_repa):
        assert torch.equal(a["y_in"], b["y_in"]) and torch.equal(a["z"], b["z"])


def test_label_dropout_is_shared_with_and_without_semantic_channels(prepared_dir, tmp_path, monkeypatch):
    base = _draws("latent_only", 0, prepared_dir, tmp_path, monkeypatch)
    redi = _draws("redi", 0, prepared_dir, tmp_path, monkeypatch)
    assert all(torch.equal(a["y_in"], b["y_in"]) for a, b in zip(base, redi))


def test_another_seed_draws_other_data_times_and_noise(prepared_dir, tmp_path, monkeypatch):
    a = _draws("redi", 0, prepared_dir, tmp_path, monkeypatch)
    b = _draws("redi", 1, prepared_dir, tmp_path, monkeypatch)
    for key in ("x", "t", "x_t"):
        assert not any(torch.equal(p[key], q[key]) for p, q in zip(a, b)), key
    assert not all(torch.equal(p["y"], q["y"]) for p, q in zip(a, b))


# ----------------------------------------------------------------------------------------------
# Evaluation: labels and initial noise per batch depend only on (eval.seed, shard, batch)


def test_sampling_noise_of_every_batch_is_shared_by_specs_with_the_same_eval_seed(monkeypatch):
    from bench.evaluate import sampling

    seen: dict[str, list] = {}

    def fake_draw(model, transport, guidance, cfg, manifest, y, generator, device):
        x = torch.randn((y.shape[0], 4, 2, 2), generator=generator)
        z = torch.randn((y.shape[0], cfg.semantic_channels, 2, 2), generator=generator) \
            if cfg.semantic_channels else None
        seen.setdefault(cfg.spec, []).append((y.clone(), x))
        return x, z

    monkeypatch.setattr(sampling, "draw_batch", fake_draw)
    monkeypatch.setattr(sampling, "decode_to_uint8", lambda vae, x, size: x.numpy())
    monkeypatch.setattr(sampling, "_write_npz", lambda path, arrays: None)

    class Bar:
        def update(self, n):
            pass

    from bench.compose import load_config

    for spec, seed in (("latent_only", 3), ("redi", 3), ("redi", 4)):
        cfg = load_config(["scale=embedded", f"spec={spec}"])
        setting = sampling.SamplingSetting(step=1, weights="ema", weights_sha256="x", prepared_settings_hash="p",
                                           sampler="euler", num_sampling_steps=2, guidance={}, seed=seed,
                                           label_sampling="random", num_classes=10, shard_size=12, batch_size=5)
        key = f"{spec}-{seed}"
        cfg.spec = key
        for index in range(2):
            sampling._sample_shard(Path("."), index, 12, setting, cfg, {}, None, None, None, None,
                                   torch.device("cpu"), Bar())
    assert len(seen["redi-3"]) == 6  # 2 shards x batches of 5, 5, 2
    for (y0, x0), (y1, x1) in zip(seen["latent_only-3"], seen["redi-3"]):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    assert not any(torch.equal(x0, x1) for (_, x0), (_, x1) in zip(seen["redi-3"], seen["redi-4"]))


# ----------------------------------------------------------------------------------------------
# The grid schema


def _grid(tmp_path: Path, text: str, name: str = "paired"):
    (tmp_path / f"{name}.yaml").write_text(text)
    return load_grid(name, tmp_path)


PAIRED = """
name: paired
base: [scale=embedded, train.max_steps=20, train.ckpt_every=10]
specs: [latent_only, redi]
seeds: {paired: [0, 2]}
axes:
  model.pca_rank: [4, 8]
exclude:
  - {spec: latent_only, model.pca_rank: 8}
patches:
  - {match: {spec: redi, train.seed: 2}, overrides: [objective.lambda_z=0.5]}
eval: {steps: [20]}
"""


def test_paired_seeds_set_train_and_eval_seed_together(tmp_path):
    cells = {c.name: c for c in expand(_grid(tmp_path, PAIRED))}
    assert sorted(cells) == sorted(["latent_only-pca_rank=4-seed=0", "latent_only-pca_rank=4-seed=2",
                                    "redi-pca_rank=4-seed=0", "redi-pca_rank=4-seed=2",
                                    "redi-pca_rank=8-seed=0", "redi-pca_rank=8-seed=2"])
    for name, cell in cells.items():
        seed = int(name.rsplit("=", 1)[1])
        assert cell.cfg.train.seed == seed and cell.cfg.eval.seed == seed
        assert cell.labels["train.seed"] == str(seed)
    assert cells["redi-pca_rank=4-seed=2"].cfg.objective.lambda_z == 0.5  # a patch may match a seed
    assert cells["redi-pca_rank=4-seed=0"].cfg.objective.lambda_z == 1.0
    # eval.seed is not part of the run's identity: the folder is that of train.seed alone
    independent = PAIRED.replace("seeds: {paired: [0, 2]}\n", "").replace(
        "model.pca_rank: [4, 8]", "model.pca_rank: [4, 8]\n  train.seed: [0, 2]")
    folders = {c.name: c.run_dir for c in expand(_grid(tmp_path, independent))}
    assert folders["redi-pca_rank=8-seed=2"] == cells["redi-pca_rank=8-seed=2"].run_dir


@pytest.mark.parametrize("seeds, fragment", [
    ("[0, 1]", "seeds must be {paired"),
    ("{paired: []}", "non-empty list of distinct"),
    ("{paired: [0, 0]}", "non-empty list of distinct"),
    ("{paired: [-1]}", "non-empty list of distinct"),
    ("{common: [0]}", "seeds must be {paired"),
])
def test_bad_seed_schema_is_one_clear_error(seeds, fragment, tmp_path):
    with pytest.raises(GridError, match=fragment.replace("{", r"\{")):
        _grid(tmp_path, PAIRED.replace("{paired: [0, 2]}", seeds))


def test_seeds_given_twice_is_refused(tmp_path):
    with pytest.raises(GridError, match="give the seeds once"):
        _grid(tmp_path, PAIRED.replace("model.pca_rank: [4, 8]", "model.pca_rank: [4, 8]\n  train.seed: [0]"))
