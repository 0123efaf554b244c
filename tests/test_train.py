"""The training loop: every spec trains and logs exactly its loss terms, bad configs write nothing,
finished runs return at once, the NaN guard, and bit-exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_train import SPECS, one_thread, prepared_dir, tensors_of, tiny_config, tiny_overrides, write_prepared  # noqa: F401

from bench import runfolder
from bench.compose import dumps, load_config
from bench.config import ConfigError
from bench.precision import resolve_precision
from bench.run_hash import run_dir
from bench.train.checkpoint import verify_checkpoint
from bench.train.data import GlobalBatchSampler
from bench.train.loop import train
from bench.train.step import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]

# Terms each spec switches on (ablations/spec/*.yaml): semantic with fusion != none, repa with lambda_repa > 0.
EXPECTED_TERMS = {
    "latent_only": {"loss", "loss/latent"},
    "redi": {"loss", "loss/latent", "loss/semantic"},
    "redi_rg": {"loss", "loss/latent", "loss/semantic"},
    "redi_repa": {"loss", "loss/latent", "loss/semantic", "loss/repa"},
    "repa": {"loss", "loss/latent", "loss/repa"},
}


def _metrics(path: Path) -> list[dict]:
    return runfolder.read_jsonl(path / runfolder.METRICS_FILE)


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_trains_and_logs_exactly_its_terms(spec, prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, tmp_path, spec=spec)
    out = train(cfg)
    assert out == run_dir(cfg)
    lines = _metrics(out)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        assert {k for k in line if k.startswith("loss")} == EXPECTED_TERMS[spec]
        assert {"grad_norm", "lr", "images_per_s", "peak_memory_mb", "time"} <= set(line)
        assert all(torch.isfinite(torch.tensor(line[k])) for k in EXPECTED_TERMS[spec])
    assert [step for step, _ in runfolder.list_checkpoints(out)] == [2, 4]
    assert (out / "DONE").is_file()
    assert json.loads((out / "config.json").read_text()) == json.loads(dumps(cfg))
    weights = tensors_of(out / "checkpoints" / "0000004")
    # The zero-initialised output head has moved, and the EMA (decay 0.9) lags behind the model.
    assert weights["model.final_layer.linear.weight"].abs().max() > 0
    assert not torch.equal(weights["model.final_layer.linear.weight"], weights["ema.final_layer.linear.weight"])


def test_ddpm_with_learned_variance_logs_the_vlb(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, tmp_path, "objective.transport=ddpm", "eval.sampler=ddpm",
                      "model.learn_sigma=true", "train.max_steps=2")
    lines = _metrics(train(cfg))
    assert {k for k in lines[-1] if k.startswith("loss")} == {"loss", "loss/latent", "loss/semantic", "loss/vlb"}


def _spy_on_dtypes(monkeypatch) -> dict[str, set]:
    """Record the dtypes the network returns and the loss terms have, inside bench.train.loop's loop."""
    import bench.train.loop as train_module

    seen: dict[str, set] = {"output": set(), "losses": set(), "params": set()}
    real_model, real_transport = train_module.build_model, train_module.build_transport

    def build_model(*args, **kwargs):
        model = real_model(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, out: seen["output"].update({out.x.dtype, out.z.dtype}))
        model.register_forward_pre_hook(
            lambda module, inputs: seen["params"].update(p.dtype for p in module.parameters()))
        return model

    def build_transport(*args, **kwargs):
        transport = real_transport(*args, **kwargs)
        real_losses = transport.training_losses

        def training_losses(*a, **k):
            losses = real_losses(*a, **k)
            seen["losses"].update(v.dtype for v in losses.values())
            return losses

        transport.training_losses = training_losses
        return transport

    monkeypatch.setattr(train_module, "build_model", build_model)
    monkeypatch.setattr(train_module, "build_transport", build_transport)
    return seen


def test_precision_auto_follows_the_cpus_bf16_units_and_bf16_autocast_trains(prepared_dir, tmp_path, monkeypatch):
    import bench.precision as precision_module

    cpu = torch.device("cpu")
    # auto = bf16 where it was measured faster: training and sampling with AMX only, the encoder
    # with AVX512-BF16 too; without either, fp32 everywhere
    for flags, train_and_eval, encoder in (({"avx2"}, None, None), ({"avx512_bf16"}, None, torch.bfloat16),
                                           ({"avx512_bf16", "amx_bf16"}, torch.bfloat16, torch.bfloat16)):
        monkeypatch.setattr(precision_module, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert resolve_precision("auto", cpu) is train_and_eval
        assert resolve_precision("auto", cpu, "eval.precision") is train_and_eval
        assert resolve_precision("auto", cpu, "encoder.precision") is encoder
        assert resolve_precision("bf16", cpu) is torch.bfloat16 and resolve_precision("fp32", cpu) is None
    monkeypatch.undo()
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    seen = _spy_on_dtypes(monkeypatch)
    out = train(tiny_config(prepared_dir, tmp_path, "train.precision=bf16", "train.max_steps=2", "spec=redi_repa"))
    # Autocast really ran the network in bf16, on fp32 master weights, with fp32 losses.
    assert seen == {"output": {torch.bfloat16}, "losses": {torch.float32}, "params": {torch.float32}}
    line = _metrics(out)[-1]
    assert all(torch.isfinite(torch.tensor(line[k])) for k in line if k.startswith("loss"))
    weights = tensors_of(out / "checkpoints" / "0000002")
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights
    state = json.loads((out / "checkpoints" / "0000002" / "state.json").read_text())
    assert state["state"]["precision"] == "bf16"

    seen = _spy_on_dtypes(monkeypatch)  # and auto on CPU is plain fp32
    train(tiny_config(prepared_dir, tmp_path, "train.max_steps=1", "spec=redi"))
    assert seen["output"] == {torch.float32} and seen["losses"] == {torch.float32}


def test_compile_auto_resolves_per_device_and_run_length():
    """auto (None, written `auto` or `null`) compiles on a CPU for runs of AUTO_COMPILE_MIN_STEPS or
    more, never on a GPU (the official code's eager step; not measured there); true and false are
    taken as said. Both scales are auto, so a paper-scale run on a GPU stays eager."""
    from bench.train.step import AUTO_COMPILE_MIN_STEPS, resolve_compile

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_compile(None, cpu, AUTO_COMPILE_MIN_STEPS) is True
    assert resolve_compile(None, cpu, AUTO_COMPILE_MIN_STEPS - 1) is False
    assert resolve_compile(None, gpu, 10**6) is False
    assert resolve_compile(True, gpu, 1) is True and resolve_compile(False, cpu, 10**6) is False
    assert load_config([]).train.compile is None and load_config(["scale=paper"]).train.compile is None
    paper = load_config(["scale=paper"]).train
    assert resolve_compile(paper.compile, gpu, paper.max_steps) is False
    assert resolve_compile(paper.compile, cpu, paper.max_steps) is True
    assert load_config(["train.compile=auto"]).train.compile is None
    assert load_config(["scale=paper", "train.compile=FALSE"]).train.compile is False
    assert load_config(["scale=paper", "train.compile=AUTO"]).train.compile is None
    assert load_config(["train.compile=null"]).train.compile is None
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(["train.compile=sometimes"])


class _FailingCompile:
    """What torch.compile returns when inductor cannot build its kernels: a callable that raises."""

    def __init__(self, net):
        self.net = net

    def __call__(self, *args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\nno compiler found")


def test_compile_auto_falls_back_to_eager_with_one_warning_and_true_stops(prepared_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """A run that compiles under auto but whose first compiled call fails trains eagerly: the same
    weights bit for bit as train.compile=false, one warning on stderr. With train.compile=true the
    failure stops the run with the setting to change named."""
    import bench.train.step as step_module

    monkeypatch.setattr(step_module, "AUTO_COMPILE_MIN_STEPS", 1)
    eager = train(tiny_config(prepared_dir, tmp_path / "eager", "train.max_steps=2"))
    monkeypatch.setattr(step_module.torch, "compile", _FailingCompile)
    capsys.readouterr()
    fallback = train(tiny_config(prepared_dir, tmp_path / "auto", "train.max_steps=2", "train.compile=auto"))
    err = capsys.readouterr().err
    assert err.count("torch.compile could not compile the network") == 1 and "training eagerly" in err
    a, b = tensors_of(eager / "checkpoints" / "0000002"), tensors_of(fallback / "checkpoints" / "0000002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="set train.compile=false"):
        train(tiny_config(prepared_dir, tmp_path / "true", "train.max_steps=2", "train.compile=true"))


def test_compiled_training_reports_the_compile_and_matches_eager(prepared_dir, tmp_path, capsys):
    """train.compile=true through the real loop: inductor on this CPU, the first step's time (the
    compile) printed once, and the weights within float32 rounding of the eager run's (1e-5, as
    tests/test_perf.py's compiled step: fused kernels sum in another order)."""
    eager = train(tiny_config(prepared_dir, tmp_path / "eager", "train.max_steps=2"))
    capsys.readouterr()
    compiled = train(tiny_config(prepared_dir, tmp_path / "compiled", "train.max_steps=2", "train.compile=true"))
    out = capsys.readouterr().out
    assert out.count("torch.compile (train.compile=true): the first step, which compiles the network, took") == 1
    a, b = tensors_of(eager / "checkpoints" / "0000002"), tensors_of(compiled / "checkpoints" / "0000002")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_gradient_clipping_bounds_the_update_norm_and_logs_the_raw_norm(prepared_dir, tmp_path):
    """optim.max_grad_norm: the gradient the optimiser steps on has at most that norm; metrics.jsonl
    logs the norm before clipping. Without clipping the two are the same."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    stepped: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        stepped.append(torch.nn.utils.get_total_norm(grads).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        clipped = _metrics(train(tiny_config(prepared_dir, tmp_path / "clip", "optim.max_grad_norm=0.01")))
        clipped_steps, stepped[:] = list(stepped), []
        raw = _metrics(train(tiny_config(prepared_dir, tmp_path / "raw")))
    finally:
        handle.remove()
    assert len(clipped_steps) == 4 and len(stepped) == 4
    for line, norm in zip(clipped, clipped_steps):
        assert line["grad_norm"] > 0.1 and norm == pytest.approx(0.01, rel=1e-3)  # clip_grad_norm_ semantics
    for line, norm in zip(raw, stepped):
        assert norm == pytest.approx(line["grad_norm"], rel=1e-5)  # single process: the logged norm is the stepped one


def test_milestones_are_saved_and_kept(prepared_dir, tmp_path):
    out = train(tiny_config(prepared_dir, tmp_path, "train.max_steps=6", "train.ckpt_every=4",
                            "train.keep_last=1", "train.milestones=[3]"))
    assert [step for step, _ in runfolder.list_checkpoints(out)] == [3, 6]  # 4 was pruned (keep_last=1)


def test_finished_run_returns_at_once_and_changes_nothing(prepared_dir, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(prepared_dir, tmp_path, "train.max_steps=2")
    out = train(cfg)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run built a model or opened its data")

    # "At once" means no model is built and no data is opened, which a clock under load cannot tell.
    monkeypatch.setattr("bench.train.loop.build_model", refuse)
    monkeypatch.setattr("bench.train.data.open_split", refuse)
    assert train(cfg) == out
    assert "is finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_existing_folder_of_another_config_is_refused(prepared_dir, tmp_path):
    out = train(tiny_config(prepared_dir, tmp_path, "train.max_steps=2"))
    other = tiny_config(prepared_dir, tmp_path, "train.max_steps=2", "optim.lr=0.01")
    with pytest.raises(ConfigError, match=r"optim.lr: saved 0.001 vs now 0.01"):
        train(other, out)


@pytest.fixture(scope="module")
def odd_prepared(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    return {"dinov2": write_prepared(root / "dinov2", train_count=8, encoder_id="dinov2_vitb14_reg_224px"),
            "nofeatures": write_prepared(root / "nofeatures", train_count=8, store_features=False)}


BAD_LOAD = [  # rejected when the config is composed
    (["spec=nope"], "Available specs"),
    (["model.nope=1"], "model.nope is not a setting: model has the keys"),
    (["optim.lr=-1"], "optim.lr"),
    (["objective.p_drop=-0.2"], "objective.p_drop"),
    (["objective.lambda_repa=-0.5"], "objective.lambda_repa"),
    (["spec=latent_only", "objective.p_drop=0.2"], "needs semantic channels"),
    (["model.pca_rank=0"], "model.pca_rank=0"),  # merged fusion with no semantic channels
    (["objective.lambda_z=-1"], "objective.lambda_z"),
    (["train.ema_decay=-0.5"], "train.ema_decay"),
    (["model.class_dropout_prob=1.0"], "model.class_dropout_prob"),
]
BAD_TRAIN = [  # rejected by train() before anything is written
    ("ok", ["model.pca_rank=6", "encoder.pca_rank_max=8"], "exceeds the 4 PCA coordinates stored"),
    ("ok", ["encoder.kind=dinov2"], "shards from another encoder"),
    ("dinov2", ["encoder.kind=dinov2", "encoder.variant=vitb14"], "shards from another encoder"),
    ("dinov2", ["encoder.kind=dinov2", "encoder.variant=vitl14_reg"], "shards from another encoder"),
    ("nofeatures", ["spec=redi_repa"], "store_features"),
    ("ok", ["data.name=fashion_mnist"], "data.name"),
    ("ok", ["model.hidden_size=30"], "hidden_size"),
    ("ok", ["spec=repa", "objective.align_layer=3"], "align_layer"),
    ("missing", [], "no finished prepare"),
]


@pytest.mark.parametrize("overrides, fragment", BAD_LOAD)
def test_bad_config_fails_at_load(overrides, fragment, prepared_dir, tmp_path):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(prepared_dir, tmp_path / "runs", *overrides)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("data, overrides, fragment", BAD_TRAIN)
def test_bad_config_fails_in_train_and_writes_nothing(data, overrides, fragment, prepared_dir, odd_prepared, tmp_path):
    source = {"ok": prepared_dir, "missing": tmp_path / "nowhere"}.get(data) or odd_prepared[data]
    cfg = tiny_config(source, tmp_path / "runs", *overrides)
    with pytest.raises(ConfigError, match=fragment):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(prepared_dir, tmp_path):
    # lr = 1e6: the first AdamW update moves every weight by ~1e6, the loss overflows two steps later.
    cfg = tiny_config(prepared_dir, tmp_path, "optim.lr=1e6", "train.max_steps=40", "train.ckpt_every=1")
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite loss or gradient at step \d+.*last good checkpoint is step") as err:
        train(cfg)
    bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    steps = [step for step, _ in runfolder.list_checkpoints(run_dir(cfg))]
    assert steps[-1] == bad_step - 1 and not (run_dir(cfg) / "DONE").exists()
    verify_checkpoint(run_dir(cfg) / "checkpoints" / f"{bad_step - 1:07d}")  # intact: checksums match
    last_good = tensors_of(run_dir(cfg) / "checkpoints" / f"{bad_step - 1:07d}")
    assert all(torch.isfinite(t).all() for t in last_good.values())


def test_sampler_is_a_seeded_stream_of_epoch_permutations():
    sampler = GlobalBatchSampler(num_items=10, batch_size=4, seed=3)
    stream = torch.cat([sampler.indices(step) for step in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a new permutation each epoch
    fresh = GlobalBatchSampler(num_items=10, batch_size=4, seed=3)
    assert torch.equal(fresh.indices(3), sampler.indices(3))  # position is a function of the step
    assert sampler.position(3) == {"samples_seen": 12, "epoch": 1, "offset": 2}


@pytest.mark.timeout(240)
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(prepared_dir, tmp_path):
    steps = 120
    overrides = (f"train.max_steps={steps}", "train.ckpt_every=10", "train.keep_last=20", "spec=redi_repa",
                 "objective.p_drop=0.2")
    reference = train(tiny_config(prepared_dir, tmp_path / "reference", *overrides))

    cfg = tiny_config(prepared_dir, tmp_path / "killed", *overrides)
    config_path = tmp_path / "config.json"
    config_path.write_text(dumps(cfg))
    command = [sys.executable, "-m", "bench.train.loop", "--config", str(config_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    target = random.Random().randint(15, 60)  # a random step past the first checkpoint (10)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = run_dir(cfg) / "metrics.jsonl"  # absolute: output_root is under tmp_path
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= target:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_dir = metrics.parent
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "DONE").exists() and runfolder.list_checkpoints(killed_dir)

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    resumed_from = int(re.search(r"resuming from checkpoint step (\d+)", resumed.stdout).group(1))
    assert 10 <= resumed_from < steps
    a = tensors_of(reference / "checkpoints" / f"{steps:07d}")
    b = tensors_of(killed_dir / "checkpoints" / f"{steps:07d}")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # The log is continuous: every step once, in order, after the replayed tail was dropped.
    assert [line["step"] for line in _metrics(killed_dir)] == list(range(1, steps + 1))


@pytest.mark.timeout(120)
def test_online_encoder_features_equal_the_stored_ones(tmp_path):
    """encoder.online_features runs the encoder on the batch's images (found through the shards'
    `indices`); on the same images it must give the features prepare stores."""
    from bench.config import DataConfig, EncoderConfig
    from bench.prepare.dataset import read_manifest
    from bench.prepare.encoders import build_semantic_encoder
    from bench.prepare.sources import open_split
    from bench.train.data import TrainingData

    encoder = build_semantic_encoder(EncoderConfig(kind="efficientnet_lite0"), 32)
    image_indices = torch.arange(40, 24, -1)  # 16 rows, not the identity map
    images = open_split(DataConfig(name="digits", image_size=32), "train").images(image_indices.tolist())
    stored = write_prepared(tmp_path / "prepared", train_count=16, shard_size=6, image_indices=image_indices,
                            features=encoder.encode(images))
    targets = {}
    for online in (False, True):
        cfg = tiny_config(stored, tmp_path / "runs", "spec=repa", f"encoder.online_features={online}")
        data = TrainingData(cfg, read_manifest(stored), torch.device("cpu"))
        _, _, _, targets[online] = data.batch(1, torch.Generator().manual_seed(0), slice(0, 8), token_grid=8)
    assert targets[True].shape == (8, 64, encoder.info.channels)
    # Stored features are float16: relative rounding 2^-11 ~ 5e-4, hence rtol 1e-3 (atol for ~0 values).
    torch.testing.assert_close(targets[True], targets[False], rtol=1e-3, atol=1e-3)
    assert targets[True].abs().max() > 0.1  # real features, not zeros
    lines = _metrics(train(tiny_config(stored, tmp_path / "runs", "spec=repa", "encoder.online_features=true",
                                       "train.max_steps=2")))
    assert "loss/repa" in lines[-1]
    # The switch's purpose: shards prepared without the raw features still train REPA online.
    bare = write_prepared(tmp_path / "bare", train_count=16, shard_size=6, image_indices=image_indices,
                          features=encoder.encode(images), store_features=False)
    with pytest.raises(ConfigError, match="store_features"):
        train(tiny_config(bare, tmp_path / "runs2", "spec=repa", "train.max_steps=2"))
    cfg = tiny_config(bare, tmp_path / "runs2", "spec=repa", "encoder.online_features=true")
    data = TrainingData(cfg, read_manifest(bare), torch.device("cpu"))
    assert data.dataset.features is None  # nothing stored: the target can only come from the encoder
    _, _, _, online_target = data.batch(1, torch.Generator().manual_seed(0), slice(0, 8), token_grid=8)
    torch.testing.assert_close(online_target, targets[True])
    lines = _metrics(train(tiny_config(bare, tmp_path / "runs2", "spec=repa", "encoder.online_features=true",
                                       "train.max_steps=2")))
    assert {k for k in lines[-1] if k.startswith("loss")} == EXPECTED_TERMS["repa"]


def test_resume_on_other_prepared_data_is_refused(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, tmp_path / "runs", "train.max_steps=4")
    out = train(cfg)
    (out / "DONE").unlink()
    shutil.rmtree(out / "checkpoints" / "0000004")
    other = write_prepared(tmp_path / "other", seed=1)  # same format, other settings hash
    moved = tiny_config(other, tmp_path / "runs", "train.max_steps=4")
    assert run_dir(moved) == out  # data.prepared_dir is not part of the run identity
    with pytest.raises(ConfigError, match="trained on other prepared data"):
        train(moved)


def test_progress_bar_only_on_a_terminal(prepared_dir, tmp_path, capsys, monkeypatch):
    train(tiny_config(prepared_dir, tmp_path / "a", "train.max_steps=2"))
    assert "2/2" not in capsys.readouterr().err  # a batch job's log stays free of bar redraws
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(tiny_config(prepared_dir, tmp_path / "b", "train.max_steps=2"))
    err = capsys.readouterr().err
    assert "2/2" in err and "step" in err and "loss=" in err


def test_cli_trains_and_reports_bad_data_in_one_line(prepared_dir, tmp_path, capsys):
    from bench.cli import main as bench

    assert bench(["train", *tiny_overrides(prepared_dir, tmp_path / "runs", "train.max_steps=1")]) == 0
    capsys.readouterr()
    assert bench(["train", *tiny_overrides(prepared_dir, tmp_path / "runs", "train.max_steps=1")]) == 0
    assert "is finished" in capsys.readouterr().out  # re-running a finished run says so and exits 0
    overrides = tiny_overrides(prepared_dir, tmp_path / "runs", "train.max_steps=1")
    assert bench(["train", *overrides[:3], "--run-dir", str(tmp_path / "mixed"), *overrides[3:]]) == 0
    assert (tmp_path / "mixed" / "DONE").is_file()  # overrides may come before and after options
    assert bench(["train", *tiny_overrides(prepared_dir, tmp_path / "bad", "encoder.kind=dinov2")]) == 2
    assert "bench train: error:" in capsys.readouterr().err and not (tmp_path / "bad").exists()
