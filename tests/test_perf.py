"""`bench perf`: the JSONL schema, the targets report, the loss agreement and the statistics.

Speed targets are judged by the benchmark's own report, never here (timings on a shared CI machine
are noise); these tests check that the report *contains* every target line with a PASS/FAIL and a
measured value, that rows carry what `bench grid --dry-run` and readers need, and the parts that are
exact: statistics, paired ratios, the loss agreement of the default precision with float64.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
import statistics

import numpy as np
import pytest
import torch

from bench.perf import command as perf
from bench.perf.setup import ENCODER_SHAPES, PerfError, compose_spec, parse_size, synthetic_geometry, synthetic_pool
from bench.perf.timing import REPO_ROOT, Workload, paired_time_ratio, summarize
from bench.perf.training import DEFAULT_LOSS_RTOL, FP32_LOSS_RTOL, loss_agreement

ROW_KEYS = {"kind", "name", "model_size", "spec", "batch", "images_per_s", "iqr", "min", "max", "repeats",
            "device", "device_name", "cpu_model", "cpu_kernels", "threads", "dtype", "precision", "torch_version",
            "git_commit", "command", "created_at", "peak_memory_mb", "times_s", "calls_per_repeat",
            "run_id", "data", "versions"}


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = perf.main(argv)
    return status, out.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `bench perf --quick` over every kind (two specs keep it short), as CI runs it; bf16
    training is asked for explicitly so that the precision fields are checked on any CPU."""
    out = tmp_path_factory.mktemp("perf")
    status, text = run_cli(["--quick", "--device", "cpu", "--specs", "latent_only,redi", "--out", str(out),
                            "--precision", "bf16", "--set", "eval.precision=fp32"])
    files = sorted(out.glob("*.jsonl"))
    assert status == 0 and len(files) == 1, text
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    targets = json.loads(files[0].with_name(files[0].name.replace(".jsonl", ".targets.json")).read_text())
    return rows, targets, text


def test_rows_have_the_schema_and_consistent_numbers(quick_run):
    rows, _, _ = quick_run
    assert {r["kind"] for r in rows} == {"train", "sample", "prepare", "eval"}
    for row in rows:
        missing = ROW_KEYS - set(row)
        assert not missing, (row["name"], missing)
        assert row["repeats"] == len(row["times_s"]) == 3  # --quick: 3 repeats
        assert row["device"] == "cpu" and row["threads"] >= 1 and row["torch_version"] == torch.__version__
        assert row["model_size"] == "custom:2,64,2,1" and row["command"].startswith("bench perf --quick --device cpu")
        dt.datetime.fromisoformat(row["created_at"])
        # images/s is recomputed from the raw repeat times, independently of summarize()
        per_repeat = [row["batch"] * row["calls_per_repeat"] / t for t in row["times_s"]]
        assert row["images_per_s"] == pytest.approx(statistics.median(per_repeat), rel=1e-4)  # times rounded to 1 us
        assert row["min"] <= row["images_per_s"] <= row["max"] and row["iqr"] >= 0
    train = {r["spec"]: r for r in rows if r["kind"] == "train" and r["mode"] != "floor"}
    assert set(train) == {"latent_only", "redi", "reference", "reference_precomputed"}
    # the arithmetic floor of each network in each precision a row ran (the reference is fp32)
    floors = {r["spec"]: r for r in rows if r["kind"] == "train" and r["mode"] == "floor"}
    assert set(floors) == {"floor latent_only bf16", "floor redi bf16", "floor redi fp32"}
    assert train["redi"]["floor_share"] == pytest.approx(
        floors["floor redi bf16"]["seconds_per_call"] / train["redi"]["seconds_per_call"], abs=1e-4)
    for spec in ("latent_only", "redi"):  # what the launcher's GPU-hour estimate reads
        assert train[spec]["mode"] == "default" and train[spec]["images_per_s"] > 0
        assert train[spec]["precision"] == "bf16" and train["reference"]["precision"] == "fp32"
        assert train[spec]["activation_checkpointing"] is False and train[spec]["semantic_features"] == "precomputed"
    ref = train["reference"]
    assert (ref["mode"], ref["dtype"], ref["activation_checkpointing"], ref["semantic_features"],
            ref["reference_of"]) == ("reference", "fp32", True, "online", "redi")
    assert "efficientnet_lite0" in ref["online_encoder"]
    # checkpointing really is on in the reference: autograd keeps less than without it
    assert ref["activation_memory_mb"] < train["redi"]["activation_memory_mb"]
    for row in train.values():  # weights + EMA (all P) + grads + 2 AdamW moments (P minus pos_embed)
        trainable = row["parameters"] - row["tokens"] * 64  # frozen pos_embed: 64 tokens x width 64
        assert row["state_memory_mb"] == pytest.approx((2 * row["parameters"] + 3 * trainable) * 4 / 2**20, abs=0.01)
    assert train["redi"]["semantic_channels"] == 8 and train["latent_only"]["semantic_channels"] == 0
    guidance = {(r["spec"], r["guidance"]): r["branches"] for r in rows if r["kind"] == "sample"}
    # sampling is timed as `bench sample` runs it: in eval.precision (fp32 here), whatever training's
    assert {(r["precision"], r["dtype"]) for r in rows if r["kind"] == "sample"} == {("fp32", "fp32")}
    assert guidance == {("latent_only", "none"): 1, ("latent_only", "cfg"): 2, ("redi", "none"): 1,
                        ("redi", "cfg"): 2, ("redi", "rg"): 2, ("redi", "cfg+rg"): 3}
    assert {r["encoder"] for r in rows if r["kind"] == "prepare"} == {"vae_embedded", "efficientnet_lite0"}


def test_report_lists_every_target_with_a_verdict(quick_run):
    _, targets, text = quick_run
    section = text.split("\ntargets\n", 1)[1]
    expected = [r"train: default >= 2\.0x reference mode \(redi, batch 4\): measured [\d.]+x",
                r"train: redi merged <= 1\.03x latent_only time per step: measured [\d.]+x",
                r"sample: cfg step <= 2\.1x unguided \(redi, one batched call\): measured [\d.]+x",
                r"sample: rg step <= 2\.1x unguided \(redi, one batched call\): measured [\d.]+x",
                r"loss: default \(\w+\) vs float64, relative, redi: measured",
                r"loss: fp32 and reference \(checkpointed\) vs float64"]
    for pattern in expected:
        assert re.search(r"^  (PASS|FAIL)  " + pattern, section, re.M), pattern
    assert re.search(r"^  INFO  sample: cfg\+rg step / unguided", section, re.M)
    assert {t["status"] for t in targets["targets"]} <= {"PASS", "FAIL", "INFO"}
    for t in targets["targets"]:
        if t["status"] in ("PASS", "FAIL"):  # the verdict follows from the stored numbers
            ok = t["measured"] >= t["threshold"] if t["comparison"] == ">=" else t["measured"] <= t["threshold"]
            assert (t["status"] == "PASS") == ok


def test_loss_check_of_the_run_passes(quick_run):
    _, targets, _ = quick_run
    losses = [t for t in targets["targets"] if t["name"].startswith("loss:")]
    assert len(losses) == 2 and all(t["status"] == "PASS" for t in losses)


def test_default_precision_loss_agrees_with_float64():
    """A wider model than --quick (width 128, 3 blocks; bf16 errors grow with width and depth), on
    redi_repa: every loss term (latent, semantic, REPA) goes through the autocast path. The --quick
    run above checks plain redi."""
    spec = "redi_repa"
    size = parse_size("custom:3,128,4,1")
    cfg = compose_spec(spec, size, "embedded", ["objective.align_layer=2"])
    geometry = synthetic_geometry(cfg)
    pool = synthetic_pool(geometry, batch=8, rank=8, device=torch.device("cpu"))
    check = loss_agreement(cfg, geometry, pool, torch.device("cpu"), precision="bf16")
    rel = check["rel_err"]
    assert rel["default"] <= DEFAULT_LOSS_RTOL, check
    assert rel["fp32"] <= FP32_LOSS_RTOL and rel["reference"] <= FP32_LOSS_RTOL, check
    # bf16 really ran (else the check compares fp32 with itself): its loss moves by more than 10x the
    # fp32 roundoff (~1e-7 relative); measured 2e-5 here
    assert abs(check["loss"]["default"] - check["loss"]["fp32"]) > 1e-6 * check["loss"]["fp32"]
    assert check["ok"]


def test_summarize_matches_numpy():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    stats = summarize(values)
    q25, med, q75 = np.percentile(values, [25, 50, 75])  # numpy's default: linear interpolation
    assert (stats.median, stats.q25, stats.q75) == pytest.approx((med, q25, q75), rel=1e-12)
    assert (stats.min, stats.max, stats.repeats) == (1.0, 9.0, 6)
    with pytest.raises(ValueError, match="repeats"):
        summarize([])


def test_paired_ratio_is_per_image_and_per_round():
    fast = Workload(kind="train", name="a", run=lambda: None, images_per_call=8, calls_per_repeat=2)
    slow = Workload(kind="train", name="b", run=lambda: None, images_per_call=4, calls_per_repeat=1)
    fast.times = [1.0, 2.0, 1.0]  # per image: 1/16, 2/16, 1/16
    slow.times = [1.0, 4.0, 0.5]  # per image: 1/4, 4/4, 0.5/4 -> ratios 4, 8, 2 -> median 4
    assert paired_time_ratio(slow, fast) == pytest.approx(4.0)
    slow.times = [1.0]
    with pytest.raises(ValueError, match="same rounds"):
        paired_time_ratio(slow, fast)


def test_encoder_shapes_match_the_real_encoder():
    from bench.prepare.encoders import build_efficientnet_lite0

    info = build_efficientnet_lite0(32).info
    assert (info.channels, info.grid) == (ENCODER_SHAPES["efficientnet_lite0"][0],
                                          (ENCODER_SHAPES["efficientnet_lite0"][1],) * 2)


def test_bad_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(PerfError, match="--size 'XX/3'"):
        parse_size("XX/3")
    with pytest.raises(PerfError, match="--batch must be >= 1"):
        perf.parse_args(["--batch", "0"])
    with pytest.raises(PerfError, match=r"--kinds: unknown \['bogus'\]"):
        perf.main(["--quick", "--kinds", "bogus", "--out", str(tmp_path)])
    with pytest.raises(PerfError, match="unknown spec 'nope'"):
        perf.main(["--quick", "--specs", "nope", "--kinds", "train", "--out", str(tmp_path)])
    from bench.cli import main as bench_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert bench_main(["perf", "--size", "custom:1,2"]) == 2
    assert "bench perf: error: --size 'custom:1,2'" in err.getvalue()
    assert not list(tmp_path.glob("*.jsonl"))


def test_real_prepared_data(tmp_path):
    from fixtures_train import R_MAX, write_prepared

    prepared = write_prepared(tmp_path / "prepared")
    status, text = run_cli(["--quick", "--device", "cpu", "--data", "real", "--prepared-dir", str(prepared),
                            "--kinds", "train",
                            "--specs", "redi,redi_repa", "--no-reference", "--set", f"model.pca_rank={R_MAX}",
                            "--set", f"encoder.pca_rank_max={R_MAX}", "--set", "data.name=digits",
                            "--set", "objective.align_layer=1", "--repeats", "1", "--warmup", "0",
                            "--min-repeat-seconds", "0", "--precision", "fp32", "--out", str(tmp_path / "out")])
    assert status == 0, text
    rows = [json.loads(line) for f in (tmp_path / "out").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert {r["spec"] for r in rows} == {"redi", "redi_repa", "floor redi fp32", "floor redi_repa fp32"}
    assert all(r["repeats"] == 1 for r in rows)
    assert all(r["data"] == f"real:{prepared}" and r["semantic_channels"] == R_MAX for r in rows)
    with pytest.raises(Exception, match="data.name"):  # the same refusal as `bench train`
        perf.main(["--quick", "--device", "cpu", "--data", "real", "--prepared-dir", str(prepared), "--kinds", "train",
                   "--specs", "redi", "--no-reference", "--out", str(tmp_path / "out2")])


def test_foreach_ema_equals_the_official_loop():
    """The trainer's one-kernel EMA (bench/train/step.py) is the official mul_/add_ loop that the
    reference mode runs, up to float32 rounding."""
    import copy

    from bench.perf.training import update_ema_official
    from bench.train.step import update_ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    ema_a = copy.deepcopy(model)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p))  # the model moved away from its EMA
    ema_b = copy.deepcopy(ema_a)
    for _ in range(3):
        update_ema(ema_a, model, 0.99)
        update_ema_official(ema_b, model, 0.99)
    for a, b, start in zip(ema_a.parameters(), ema_b.parameters(), copy.deepcopy(model).parameters()):
        assert not torch.equal(a, start)  # the update did something
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # float32 rounding only


# ---------------------------------------------------------------------------------------------
# --official: a stand-in checkout with the official API (models.SiT, transport.create_transport)

STAND_IN_MODELS = '''
"""Stand-in for the official models.py: SiT's constructor and forward(x, t, y) on the channel
concatenation, computing redi-bench's merged JointDiT; state_dict() in the official layout."""
import torch
from models.backbone import BackboneConfig, JointDiT
from models.official_checkpoint import export_official_state_dict

OFFSET = 0.0  # a test sets it to make the network differ from redi-bench's


class SiT(torch.nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, repa_loss=False,
                 repa_layer=8):
        super().__init__()
        assert not learn_sigma and not repa_loss
        self.net = JointDiT(BackboneConfig(hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                                           input_size=input_size, patch_size=patch_size, latent_channels=4,
                                           semantic_channels=in_channels - 4, num_classes=num_classes,
                                           class_dropout_prob=class_dropout_prob, fusion="merged"))

    def state_dict(self, *args, **kwargs):
        return export_official_state_dict(self.net, self.net.config)

    def forward(self, x, t, y):
        out = self.net(x[:, :4], t, y, x[:, 4:])
        return torch.cat([out.x, out.z], dim=1) + OFFSET
'''

STAND_IN_TRANSPORT = '''
import random
import torch
from torchdiffeq import odeint  # noqa: F401 - as the official integrators.py; not installed in CI


class Transport:
    def training_losses(self, model, x1, model_kwargs=None, dino_drop_prob=0.0, lam=1.0, dino_feats=None):
        t = torch.rand(x1.shape[0])
        x0 = torch.randn_like(x1)
        if random.random() < dino_drop_prob:
            lam = 0
            x1[:, 4:] = 0
        tt = t.view(-1, 1, 1, 1)
        xt, ut = tt * x1 + (1 - tt) * x0, x1 - x0
        out = model(xt, t, **(model_kwargs or {}))
        sq = (out - ut) ** 2
        loss = sq[:, :4].mean(dim=(1, 2, 3)) + lam * sq[:, 4:].mean(dim=(1, 2, 3))
        return {"loss": loss}


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
    assert (path_type, prediction, loss_weight) == ("Linear", "velocity", None)
    return Transport()
'''


def _stand_in_checkout(root):
    (root / "transport").mkdir(parents=True)
    (root / "models.py").write_text(STAND_IN_MODELS)
    (root / "transport" / "__init__.py").write_text("from .transport import create_transport\n")
    (root / "transport" / "transport.py").write_text(STAND_IN_TRANSPORT)
    return root


def test_official_side_by_side_with_a_stand_in_checkout(tmp_path):
    """`--official PATH` imports the checkout under private names (our `models` package stays ours),
    times its step round-robin with the default step, and checks the two networks' losses agree."""
    import sys

    import bench.perf.official_step as official

    checkout = _stand_in_checkout(tmp_path / "ReDi")
    status, text = run_cli(["--quick", "--device", "cpu", "--specs", "redi", "--kinds", "train", "--no-reference",
                            "--official", str(checkout), "--out", str(tmp_path / "out"), "--precision", "fp32",
                            "--profile"])
    assert status == 0, text
    assert "models.backbone" in sys.modules and sys.modules["models"].__file__.startswith(str(REPO_ROOT))
    rows = [json.loads(line) for line in next((tmp_path / "out").glob("*.jsonl")).read_text().splitlines()]
    train = {r["spec"]: r for r in rows}
    assert set(train) == {"official", "redi", "floor redi fp32"}
    assert train["official"]["official_path"] == str(checkout) and train["official"]["times_s"]
    assert train["official"]["repeats"] == train["redi"]["repeats"] == 3  # the same rounds: paired
    losses = train["official"]["official_losses"]
    assert losses and all(np.isfinite(losses))  # the official step really trained
    assert train["official"]["train_flops_per_image"] == train["redi"]["train_flops_per_image"] > 0
    section = text.split("\ntargets\n", 1)[1]
    # fp32: the speed-up as a share of the fp32 ceiling (official / fp32 floor), and the floor's share
    assert re.search(r"^  (PASS|FAIL)  train: default \(fp32\) speed-up over the official step >= 90% of the fp32 "
                     r"ceiling, side by side \(redi, batch 4\): measured [\d.]+", section, re.M)
    assert re.search(r"^  (PASS|FAIL)  train: default \(fp32\) time that is its arithmetic \(floor / step\) >= 75%: "
                     r"measured [\d.]+", section, re.M)
    assert re.search(r"^  INFO  attention: the rule's form \(sdpa\) vs the fastest measured", section, re.M)
    assert re.search(r"^  PASS  loss: official network vs redi-bench's .*: measured", section, re.M)
    # No figure from another machine (the file names in the section carry a time stamp: not figures).
    assert not re.search(r"(?<![\w/.-])43(\.\d+)?x?(?![\w/.-])", section)
    # --profile: both steps' time split by category; each step's EMA and optimiser found by region
    floor = train.pop("floor redi fp32")  # the arithmetic floor, timed in the same rounds
    assert floor["mode"] == "floor" and floor["repeats"] == 3 and floor["floor_gemm_ms"] > 0
    assert floor["floor_attention_ms"] > 0 and "profile_ms" not in floor
    for row in train.values():
        profiled = row["profile_ms"]
        assert profiled["matmul"] > 0 and profiled["optimizer"] > 0 and profiled["ema"] > 0, profiled
        assert sum(v for k, v in profiled.items() if k != "wall") == pytest.approx(profiled["wall"], rel=0.02)
        # the largest operators outside the floor: none of its categories, each within its category's
        # total, the largest first, at most three
        largest = row["profile_largest"]
        assert largest and not set(largest) & {"matmul", "attention", "unattributed"}, largest
        for category, listed in largest.items():
            times = [ms for _, ms in listed]
            assert 0 < len(listed) <= 3 and times == sorted(times, reverse=True), listed
            # (both sides rounded to 0.01 ms)
            assert sum(times) <= profiled[category] + 0.01 and times[-1] >= 0.005 * profiled["wall"] - 0.01, listed
        assert row["floor_share"] == pytest.approx(floor["seconds_per_call"] / row["seconds_per_call"], abs=1e-4)
    assert "where the time goes" in text and "arithmetic floor: redi (fp32)" in text
    assert re.search(r"^    (copies|elementwise|activation|layernorm|optimizer|ema|autograd): \S+ [\d.]+ ms", text,
                     re.M), text
    assert re.search(r"^  INFO  train: ceiling = official step / the fp32 arithmetic floor: measured [\d.]+x",
                     section, re.M)
    # the loss check can fail: an official network that differs by 1e-3 is caught
    code = official.load_official_code(checkout)
    cfg = compose_spec("redi", parse_size("custom:2,64,2,1"), "embedded", [])
    geometry = synthetic_geometry(cfg)
    assert official.official_loss_agreement(code, cfg, geometry, torch.device("cpu"))["ok"]
    code.models.OFFSET = 1e-3
    bad = official.official_loss_agreement(code, cfg, geometry, torch.device("cpu"))
    assert not bad["ok"] and bad["rel_err"] > official.OFFICIAL_LOSS_RTOL


def test_round_robin_rotates_the_order_and_keeps_rounds_paired():
    """Round r starts at workload r mod n: every workload runs once per round (the repeats stay
    paired by index), and no workload always runs right after the same one."""
    from bench.perf.timing import Workload, time_round_robin

    order = []
    workloads = [Workload(kind="train", name=n, run=lambda n=n: order.append(n), images_per_call=1) for n in "abc"]
    time_round_robin(workloads, repeats=3)
    assert order == list("abc" "bca" "cab")
    assert all(len(w.times) == 3 for w in workloads)
    followers = {(order[i], order[i + 1]) for i in range(len(order) - 1)}
    assert {f for f in followers if f[0] == "a"} != {("a", "b")}  # "b" does not always follow "a"


def test_ladder_times_the_reference_spec_even_when_specs_do_not_name_it(tmp_path, monkeypatch):
    """--ladder builds its rungs from --reference-spec (redi); with --specs latent_only and
    --no-reference it used to fail with a KeyError instead of timing the rungs. The rung that
    compiles runs eagerly here: which rungs are built is the point, and a cold compile would cost
    CI about 35 s (compiled training is tested in test_train.py)."""
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    status, text = run_cli(["--quick", "--device", "cpu", "--kinds", "train", "--specs", "latent_only",
                            "--no-reference", "--ladder", "--out", str(tmp_path)])
    assert status == 0, text
    rows = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert {"latent_only", "ladder 1: - checkpointing", "floor redi fp32"} <= {r["spec"] for r in rows}


def test_the_largest_outside_the_floor_are_three_per_category_of_half_a_percent_or_more():
    from bench.perf.profile import largest_outside_the_floor

    operators = {("matmul", "aten::mm"): 500.0, ("attention", "sdpa"): 90.0, ("copies", "aten::copy_"): 40.0,
                 ("copies", "stack"): 30.0, ("copies", "aten::fill_"): 20.0, ("copies", "aten::cat"): 10.0,
                 ("activation", "gelu"): 5.0, ("activation", "silu"): 4.9, ("unattributed", "AddmmBackward0"): 9.0}
    assert largest_outside_the_floor(operators, wall_ms=1000.0) == {
        "copies": [["aten::copy_", 40.0], ["stack", 30.0], ["aten::fill_", 20.0]], "activation": [["gelu", 5.0]]}


def test_profile_categories():
    """Operators land in their category by name; the optimiser's and the EMA's by region."""
    from bench.perf.profile import categorize

    assert categorize("aten::addmm", ()) == "matmul" and categorize("aten::mm", ("autograd::x",)) == "matmul"
    assert categorize("aten::_scaled_dot_product_flash_attention_for_cpu", ()) == "attention"
    assert categorize("aten::_softmax_backward_data", ()) == "attention"  # the math path's softmax (bf16 on a CPU)
    assert categorize("aten::native_layer_norm_backward", ()) == "layernorm"
    assert categorize("aten::gelu_backward", ()) == "activation"
    assert categorize("aten::mul", ()) == "elementwise" and categorize("aten::copy_", ()) == "copies"
    assert categorize("aten::mul_", ("aten::mul_", "ema")) == "ema"
    assert categorize("aten::addcmul_", ("aten::addcmul_", "Optimizer.step#AdamW.step")) == "optimizer"
    assert categorize("autograd::engine::evaluate_function: MmBackward0", ()) == "autograd"
    # a compiled step's kernels, named by compiled_kernel_names(): the first category their operators name
    kernel = "graph_0_cpp_fused_{}_7".format
    assert categorize(kernel("_softmax_clone_permute_unbind_view"), ()) == "attention"
    assert categorize(kernel("_to_copy_add_cat_mul_native_layer_norm_sigmoid_backward"), ()) == "layernorm"
    assert categorize(kernel("_to_copy_add_mul_sigmoid_view"), ()) == "activation"
    assert categorize(kernel("_unsafe_view_clone_permute_stack_transpose_view"), ()) == "copies"
    assert categorize(kernel("clone_mul_permute_transpose_unbind_view"), ()) == "elementwise"  # a scale fused in
    assert categorize("graph_12_cpp_fused__to_copy_mul_split_sum_unsqueeze_view_3", ()) == "elementwise"
    assert categorize("## Call CompiledFxGraph fto24ubvlstenx ##", ()) == "unattributed"
    with pytest.raises(PerfError, match="--profile .* drop --no-interleave"):
        perf.main(["--quick", "--kinds", "train", "--profile", "--no-interleave"])


def test_official_path_that_is_not_a_checkout_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PerfError, match=r"--official .*empty: not a checkout of the official ReDi code \(no "
                                        r"models\.py or transport/__init__\.py there\); clone"):
        perf.main(["--quick", "--kinds", "train", "--official", str(tmp_path / "empty"), "--out", str(tmp_path)])
    checkout = _stand_in_checkout(tmp_path / "ReDi")
    with pytest.raises(PerfError, match="has no official counterpart"):
        perf.main(["--quick", "--kinds", "train", "--reference-spec", "latent_only", "--specs", "latent_only",
                   "--official", str(checkout), "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------
# Roofline, compiled step, Table 6


@pytest.mark.parametrize("fields", [
    dict(fusion="merged", semantic_channels=4), dict(fusion="separate", semantic_channels=4), dict(fusion="none"),
    dict(fusion="merged", semantic_channels=8, projector_dim=80, align_layer=2, learn_sigma=True)])
def test_model_flops_match_torchs_flop_counter(fields):
    """The analytic forward count equals torch's FlopCounterMode on the real network, with attention
    run by the math kernel (its matmuls are then counted like any other)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.perf.roofline import forward_flops_per_image, train_flops_per_image
    from models.backbone import BackboneConfig, JointDiT

    config = BackboneConfig(hidden_size=64, depth=3, num_heads=2, input_size=8, patch_size=2, num_classes=10, **fields)
    model, batch = JointDiT(config), 3
    z = torch.randn(batch, config.semantic_channels, 8, 8) if config.semantic_channels else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 4, 8, 8), torch.rand(batch), torch.randint(0, 10, (batch,)), z)
    assert forward_flops_per_image(config) * batch == counter.get_total_flops()
    assert train_flops_per_image(config) == 3 * forward_flops_per_image(config)


@pytest.mark.parametrize("fields", [
    dict(fusion="merged", semantic_channels=4), dict(fusion="separate", semantic_channels=4), dict(fusion="none"),
    dict(fusion="merged", semantic_channels=8, projector_dim=80, align_layer=2, learn_sigma=True)])
def test_arithmetic_floor_times_the_counted_flops(fields):
    """The floor's GEMM list is the network's: its forward GEMMs plus attention's two products add
    up to the analytic forward count (itself pinned to FlopCounterMode above), exactly; the floor
    times 3 GEMMs per linear (2 where the input is a leaf) and one attention forward + backward per block."""
    from bench.perf.roofline import (
        arithmetic_floor,
        attention_shape,
        floor_ops,
        forward_flops_per_image,
        forward_gemms,
    )
    from models.backbone import BackboneConfig

    config = BackboneConfig(hidden_size=64, depth=3, num_heads=2, input_size=8, patch_size=2, num_classes=10, **fields)
    batch = 3
    b, heads, tokens, head_dim = attention_shape(config, batch)
    counted = sum(2 * g.m * g.k * g.n * g.count for g in forward_gemms(config, batch))
    attention = config.depth * 2 * (2 * b * heads * tokens * tokens * head_dim)  # QK^T and AV
    assert counted + attention == forward_flops_per_image(config) * batch
    floor = arithmetic_floor(config, batch, torch.device("cpu"), torch.float32, repeats=1, min_seconds=0.001)
    assert floor["seconds"] == pytest.approx(floor["gemm_seconds"] + floor["attention_seconds"], rel=1e-12)
    assert set(floor["by_op"]) == {g.name for g in forward_gemms(config, batch)} | {"attention"}
    assert all(v > 0 for v in floor["by_op"].values())
    # one step's kernels: 3 GEMMs per linear (2 where the input is a leaf), one attention per block
    ops = floor_ops(config, batch, torch.device("cpu"), torch.float32)
    gemms = sum(g.count * (3 if g.input_grad else 2) for g in forward_gemms(config, batch))
    assert sum(op.count for op in ops if op.kind == "gemm") == gemms
    assert [op.count for op in ops if op.kind == "attention"] == [config.depth]


def test_matmul_peak_is_measured():
    from bench.perf.roofline import matmul_peak

    fp32 = matmul_peak(torch.device("cpu"), torch.float32, size=128, repeats=3, min_seconds=0.01)
    assert 0.01 < fp32 < 1e5  # GFLOP/s: finite, positive, not a unit slip


def test_compiled_step_equals_the_eager_step():
    """torch.compile of the default step (inductor on CPU) computes the same loss and update: two
    steps from the same weights and draws agree to 1e-5 relative (fp32 reassociation only)."""
    import copy

    from bench.train.build import build_model, build_transport
    from bench.train.step import make_train_step

    cfg = compose_spec("redi", parse_size("custom:2,64,2,1"), "embedded", ["train.precision=fp32"])
    geometry = synthetic_geometry(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, geometry.manifest())
    with torch.no_grad():
        for p in model.parameters():  # leave adaLN-Zero, else the first step barely depends on the net
            p.add_(0.05 * torch.randn_like(p))
    results = []
    for compiled in (False, True):
        net = copy.deepcopy(model).train()
        step = make_train_step(net, copy.deepcopy(net).requires_grad_(False), build_transport(cfg, geometry.manifest()),
                               cfg, torch.device("cpu"))
        forward = torch.compile(net) if compiled else net
        g = torch.Generator().manual_seed(1)
        batch = synthetic_pool(geometry, 4, 8, torch.device("cpu")).batches[0]
        losses = [step(forward, batch["moments"][:, :4], batch["semantic"], batch["labels"], g)[0]["loss"].item()
                  for _ in range(2)]
        results.append((losses, torch.cat([p.detach().flatten() for p in net.parameters()])))
    (eager_losses, eager_w), (compiled_losses, compiled_w) = results
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    # AdamW divides by sqrt(v): on a near-zero gradient entry, fp32 reassociation can move that
    # entry's update by up to lr = 1e-4 per step; measured 4e-6 after two steps
    torch.testing.assert_close(compiled_w, eager_w, rtol=1e-5, atol=2e-5)
    assert not torch.equal(eager_w, torch.cat([p.detach().flatten() for p in model.parameters()]))  # it trained


def test_a_compiled_steps_profile_names_its_fused_kernels():
    """Under --profile a compiled network's time is split by its fused kernels' names, not left as
    one opaque graph call: a block's GELU and layer-norm kernels are found, the categories still sum
    to the profiled wall time, and the naming ends with the context (inductor's config restored).
    One compiled block stands for the step: the naming does not depend on the graph's size."""
    import torch._inductor.config as inductor_config

    from bench.perf.profile import by_category, compiled_kernel_names, profile_operators
    from models.backbone import DiTBlock

    torch.manual_seed(0)
    block, x, c = DiTBlock(64, 2, 4.0), torch.randn(4, 16, 64), torch.randn(4, 64)
    with torch.no_grad():
        block.adaLN_modulation[1].weight.normal_(0, 0.1)  # adaLN-Zero would zero both branches' gates
    with compiled_kernel_names():
        compiled = torch.compile(block)
        workload = Workload(kind="train", name="block", run=lambda: compiled(x, c).square().sum().backward(),
                            images_per_call=4, fields={}, device=torch.device("cpu"))
        workload.run()  # compiles, with the names
        operators, wall_ms = profile_operators(workload)
    profiled = by_category(operators, wall_ms)
    assert inductor_config.cpp.enable_kernel_profile is False
    # the compiled GELU (its sigmoid form) is a named kernel, an activation (whether it reaches
    # largest_outside_the_floor's share depends on the machine's load: the block takes microseconds)
    assert any(category == "activation" and "sigmoid" in name for category, name in operators), operators
    assert profiled["activation"] > 0 and profiled["layernorm"] > 0 and profiled["matmul"] > 0, profiled
    assert sum(v for k, v in profiled.items() if k != "wall") == pytest.approx(profiled["wall"], rel=0.02)


def test_table6_times_finished_images_with_every_step_and_the_decode(monkeypatch):
    """Scaled down on CPU (3 steps, batch 2; the paper's Appendix B: 250 steps at batch 64): one call
    runs the network once per sampling step and decodes the batch once."""
    from bench.perf import infer

    calls = {"net": 0, "decode": 0}
    real_build_model, real_build_vae = infer.build_model, infer.build_vae

    def counting_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        model.register_forward_hook(lambda *_: calls.__setitem__("net", calls["net"] + 1))
        return model

    def counting_vae(*args, **kwargs):
        vae, weights = real_build_vae(*args, **kwargs)
        decode = vae.decode
        vae.decode = lambda latents: (calls.__setitem__("decode", calls["decode"] + 1), decode(latents))[1]
        return vae, weights

    monkeypatch.setattr(infer, "build_model", counting_model)
    monkeypatch.setattr(infer, "build_vae", counting_vae)
    cfg = compose_spec("redi", parse_size("custom:2,64,2,1"), "embedded", ["eval.sampler=sde"])  # 1 call per step
    workload = infer.build_table6_workload("redi", cfg, synthetic_geometry(cfg), batch=2, steps=3,
                                           device=torch.device("cpu"), prepared_dir=None)
    workload.run()
    assert calls == {"net": 3, "decode": 1}
    assert workload.images_per_call == 2 and workload.fields["sampling_steps"] == 3
    assert workload.fields["paper_setting"] is False and workload.kind == "table6"


def test_cpu_kernels_name_the_instruction_set_and_any_restriction(monkeypatch):
    """Timings taken with AVX-512 turned off (the stand-in for an EPYC without it) must say so."""
    from bench.perf.timing import KERNEL_ISA_SETTINGS, cpu_kernels

    for name in KERNEL_ISA_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    plain = cpu_kernels()
    assert plain == torch.backends.cpu.get_cpu_capability() and "(" not in plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert cpu_kernels() == f"{plain} (ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)"


def test_attention_forms_are_timed_and_the_rule_judged():
    """bench perf times each attention form at the step's shape and checks the rule's pick against
    the fastest; fp32 is reported only (it keeps SDPA for bit-identity with the official code)."""
    from bench.perf.roofline import attention_forms
    from bench.perf.targets import attention_target
    from models.backbone import BackboneConfig

    config = BackboneConfig(hidden_size=32, depth=1, num_heads=2, input_size=4, patch_size=1, num_classes=3)
    forms = attention_forms(config, 2, torch.device("cpu"), torch.bfloat16, rounds=2, calls=1)
    assert set(forms["ms"]) == {"sdpa", "math", "sdpa-fp32"} and forms["shape"] == [2, 2, 16, 16]
    assert forms["rule"] == "math" and forms["fastest"] in forms["ms"] and forms["rule_over_fastest"] >= 1.0
    for ratio, status in ((1.05, "PASS"), (1.5, "FAIL")):
        assert attention_target(forms | {"rule_over_fastest": ratio})["status"] == status
    fp32 = attention_forms(config, 2, torch.device("cpu"), torch.float32, rounds=1, calls=1)
    assert set(fp32["ms"]) == {"sdpa", "math"} and fp32["rule"] == "sdpa"
    assert attention_target(fp32)["status"] == "INFO"


def _timed(name: str, seconds: list[float], **fields) -> Workload:
    workload = Workload(kind="train", name=name, run=lambda: None, images_per_call=4, fields=fields)
    workload.times = seconds
    return workload


@pytest.mark.parametrize("amx", [True, False])
def test_official_targets_follow_what_the_machine_allows(amx):
    """bf16 on AMX: >= 4x the official step; elsewhere >= 90% of the ceiling (official / floor of the
    default's precision); always: the floor is >= 75% of the default step. Paired per round."""
    from bench.perf.targets import official_targets

    official = _timed("official", [8.0, 16.0, 8.0], spec="official", reference_of="redi")
    default = _timed("redi", [2.5, 5.0, 2.5], spec="redi", mode="default", precision="bf16")
    floors = [_timed("floor bf16", [1.5, 3.0, 1.5], spec="floor", mode="floor", precision="bf16", reference_of="redi"),
              _timed("floor fp32", [4.0, 8.0, 4.0], spec="floor", mode="floor", precision="fp32", reference_of="redi")]
    compiled = _timed("ladder 4", [2.0, 4.0, 2.0], spec="ladder 4: default step + torch.compile", mode="default",
                      precision="bf16", compile=True)
    targets = {t["name"]: t for t in official_targets([official, default, compiled, *floors], official, 4, amx)}
    share = next(t for name, t in targets.items() if "floor / step" in name and "compile" not in name)
    assert share["measured"] == pytest.approx(0.6) and share["status"] == "FAIL"
    speed = next(t for name, t in targets.items()
                 if "the official" in name and "ceiling =" not in name and "compile" not in name)
    if amx:
        assert speed["measured"] == pytest.approx(3.2) and speed["threshold"] == 4.0 and speed["status"] == "FAIL"
    else:  # ceiling 8 / 1.5 = 5.33x; 3.2x is 60% of it
        assert speed["measured"] == pytest.approx(0.6) and speed["threshold"] == 0.9 and speed["status"] == "FAIL"
    # the compiled rung gets the same two measures, reported (INFO), never checked: it is not the default
    measures = {name: t for name, t in targets.items() if name.startswith("train: default + compile")}
    assert len(measures) == 2 and {t["status"] for t in measures.values()} == {"INFO"}
    compiled_speed = next(t for name, t in measures.items() if "floor / step" not in name)
    assert compiled_speed["measured"] == pytest.approx(4.0 if amx else 0.75)  # 8 / 2; 4x of a 5.33x ceiling
    assert next(t for name, t in measures.items() if "floor / step" in name)["measured"] == pytest.approx(0.75)
    ceilings = sorted(t["measured"] for name, t in targets.items() if name.startswith("train: ceiling"))
    assert ceilings == pytest.approx([2.0, 8.0 / 1.5])


def test_a_compiled_default_is_checked_and_its_eager_rung_reported():
    """When the default step compiles (train.compile=auto on a CPU), the checked targets are the
    compiled step's; the ladder's eager rung gets the same measures as INFO, and it sits before the
    default in the ladder."""
    from bench.perf.targets import official_targets

    official = _timed("official", [8.0, 8.0, 8.0], spec="official", reference_of="redi")
    default = _timed("redi", [2.0, 2.0, 2.0], spec="redi", mode="default", precision="bf16", compile=True)
    eager = _timed("ladder 3", [4.0, 4.0, 4.0], spec="ladder 3: default step without torch.compile", mode="default",
                   precision="bf16", compile=False)
    rung1 = _timed("ladder 1", [6.0, 6.0, 6.0], spec="ladder 1: - checkpointing", mode="reference-precomputed")
    targets = official_targets([official, default, rung1, eager], official, 4, amx=True)
    checked = [t for t in targets if t["status"] in ("PASS", "FAIL")]
    assert [t["measured"] for t in checked] == [pytest.approx(4.0)] and checked[0]["status"] == "PASS"
    info = [t for t in targets if t["name"].startswith("train: default without compile")]
    assert len(info) == 1 and info[0]["status"] == "INFO" and info[0]["measured"] == pytest.approx(2.0)
    ladder = [t["name"] for t in targets if "ladder" in t["name"]]
    assert ladder == ["train: ladder 1: - checkpointing / official step",
                      "train: ladder 3: default step without torch.compile / official step",
                      "train: ladder 4: default step (+ torch.compile) / official step"]


def test_performance_doc_tables_are_generated_from_the_checked_in_records(tmp_path):
    """docs/performance.md's tables are what bench.perf.records makes of results/readme/perf (one table per
    machine type, ratios only within a run), and a speed-up in them is the paired median of the rounds."""
    from bench.perf import records

    doc = (REPO_ROOT / "docs" / "performance.md").read_text()
    generated = records.tables(records.load_runs(REPO_ROOT / "results" / "readme" / "perf"))
    assert records.replace_generated(doc, generated) == doc, "run: python -m bench.perf.records " \
        "results/readme/perf --write docs/performance.md"
    base = dict(kind="train", batch=4, calls_per_repeat=1, git_commit="abc1234", model_size="S/2", threads=1,
                load_avg_start=[3.0], load_avg_end=[4.0], device="cpu", device_name="Some CPU", cpu_flags=["amx_bf16"],
                native_bf16=True, compile=False)
    run = [base | dict(spec="official", mode="official", precision="fp32", seconds_per_call=8.0,
                       times_s=[8.0, 16.0, 8.0]),
           base | dict(spec="redi", mode="default", precision="bf16", seconds_per_call=2.5, times_s=[2.0, 8.0, 2.0]),
           base | dict(spec="floor", mode="floor", precision="bf16", reference_of="redi", seconds_per_call=1.0,
                       times_s=[1.0, 2.0, 1.0])]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run))
    table = records.tables(records.load_runs(tmp_path))
    assert "**Some CPU (flags amx_bf16; native bf16: True)**" in table
    # paired: rounds give 4x, 2x, 4x -> 4x (a ratio of medians would say 3.2x); floor share 50%, 25%, 50% -> 50%
    assert "| 8,000 | bf16 | 2,500 | 4.00x | - / 8.00x | 50% | 4.00x / - |" in table
    # A run whose default step compiles (train.compile=auto on a CPU): its ladder rung is the eager one.
    compiled = [run[0], run[2], run[1] | dict(compile=True, times_s=[1.0, 4.0, 1.0], seconds_per_call=1.0),
                run[1] | dict(spec="ladder 3: default step without torch.compile")]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(row) + "\n" for row in compiled))
    table = records.tables(records.load_runs(tmp_path))
    assert "| 8,000 | bf16, compiled | 1,000 | 8.00x | - / 8.00x | 100% | 4.00x / 8.00x |" in table
    # Of several specs, the line is the spec the official step is paired with, not the first timed.
    several = [run[1] | dict(spec="latent_only", seconds_per_call=9.0, times_s=[9.0, 9.0, 9.0]),
               run[0] | dict(reference_of="redi"), *run[1:]]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(row) + "\n" for row in several))
    assert "| 8,000 | bf16 | 2,500 | 4.00x |" in records.tables(records.load_runs(tmp_path))
    # One device name, two machine types: the same CPU name without AMX is a table of its own.
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(row | dict(cpu_flags=["avx512_bf16"])) + "\n"
                                                  for row in run))
    table = records.tables(records.load_runs(tmp_path))
    assert table.count("**Some CPU (flags") == 2 and "**Some CPU (flags avx512_bf16; native bf16: True)**" in table


@pytest.mark.parametrize("dtype, form", [(torch.float32, "sdpa"), (torch.bfloat16, "math")])
def test_floor_runs_the_attention_the_step_runs(monkeypatch, dtype, form):
    """The arithmetic floor's attention goes through models.backbone.attend, as the network's: SDPA in
    fp32, the math path in bf16 on a CPU."""
    import models.backbone as backbone
    from bench.perf.roofline import floor_ops

    used = []
    real_math, real_sdpa = backbone.math_attention, backbone.F.scaled_dot_product_attention
    monkeypatch.setattr(backbone, "math_attention", lambda *a: used.append("math") or real_math(*a))
    monkeypatch.setattr(backbone.F, "scaled_dot_product_attention", lambda *a: used.append("sdpa") or real_sdpa(*a))
    config = backbone.BackboneConfig(hidden_size=32, depth=2, num_heads=2, input_size=4, patch_size=1, num_classes=3)
    attention = [op for op in floor_ops(config, 2, torch.device("cpu"), dtype) if op.kind == "attention"]
    assert len(attention) == 1 and attention[0].count == config.depth
    attention[0].run()
    assert used == [form]
