"""ADM's evaluator definitions (bench.evaluate.adm) on torch-fidelity's Inception port, checked
against independent float64 computations: which tensor of the port is ADM's sFID feature
`mixed_6/conv` (a forward written out layer by layer in float64), the Inception Score (scipy's KL),
k-NN precision/recall (scipy's cdist and a full sort; and ADM's float16 distances with their
float32 fallback, written again in numpy), TF32 off while features are computed, their orientation (a mode-collapsed
"generator" must give precision 1 and recall near 0, through the code path `bench eval` uses), and
the reference batch's identity. The Inception weights are a random initialisation written to a file
in torch-fidelity's layout (the real file cannot be downloaded here): the mapping and the formulas do
not depend on trained weights, and the float64 references would catch a wrong layer or formula."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from scipy.spatial.distance import cdist

from bench.atomic import sha256_file
from bench.evaluate import adm
from bench.evaluate.features import InceptionFeatures, build_feature_network, reference_statistics


def random_inception_weights(path):
    """torch-fidelity's inception-v3-compat state dict, randomly initialised (seed 0), at `path`."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None  # build without weights
    try:
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.pth")


@pytest.fixture(scope="module")
def inception(inception_weights) -> InceptionFeatures:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels every call; faster than two threads on a busy machine
    yield build_feature_network("inception", inception_weights=inception_weights)
    torch.set_num_threads(threads)


def _images(seed: int, n: int, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


# ---------------------------------------------------------------------------------------------
# The Inception port: pool3, ADM's sFID map, the logits of ADM's IS


def test_inception_from_a_user_weights_file_equals_torch_fidelitys_extractor(inception, inception_weights):
    """Pool3 features are exactly torch-fidelity's own extractor's on the same file, and the
    file's sha256 is the provenance."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = inception_weights
    assert inception.weights_sha256 == sha256_file(weights) and inception.feature_dim == 2048
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    images = _images(11, 2)
    with torch.no_grad():
        expected = theirs.eval()(images)[0]
    got = inception.extract(images)
    assert got.shape == (2, 2048) and not torch.equal(got[0], got[1])
    assert torch.equal(got, expected)  # the same module and weights: bit-identical


def test_adm_spatial_feature_is_mixed_6d_branch1x1_first_seven_channels_in_nhwc_order(inception):
    """ADM's sFID tensor `mixed_6/conv:0` is the port's `Mixed_6d.branch1x1` (conv, batch norm,
    ReLU), first 7 of its 192 channels of the 17x17 map, flattened (h, w, c): 2,023 features."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    port = inception.model
    # Identity by the graph's naming: TF numbers the Inception blocks mixed, mixed_1, ... in order,
    # so mixed_6 is the port's 7th block; `conv` is the first op of the block, its 1x1 branch.
    blocks = [name for name, _ in port.named_children() if name.startswith("Mixed_")]
    tf_index = int(adm.SPATIAL_TF_TENSOR.split("/")[0].removeprefix("mixed_") or 0)
    assert blocks[tf_index] + ".branch1x1" == adm.SPATIAL_PORT_MODULE == "Mixed_6d.branch1x1"
    assert port.get_submodule(adm.SPATIAL_PORT_MODULE).conv.weight.shape == (192, 768, 1, 1)

    images = _images(3, 2, size=256)
    out = inception.outputs(images)
    assert out["features"].shape == (2, 2048) and out["spatial"].shape == (2, adm.SPATIAL_DIM) == (2, 2023)
    assert out["logits"].shape == (2, 1008)

    # The forward written out in float64 from the port's own layers, with no hook involved.
    net = _double_copy(port)
    x = interpolate_bilinear_2d_like_tensorflow1x(images.double(), size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c"):
            x = getattr(net, name)(x)
        mixed_6_conv = net.Mixed_6d.branch1x1(x)  # (2, 192, 17, 17)
        next_block = net.Mixed_6e.branch1x1(net.Mixed_6d(x))  # mixed_7/conv: the wrong neighbour
        for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
            x = getattr(net, name)(x)
        pool = x.flatten(1)
        logits_unbiased = pool @ net.fc.weight.T  # ADM: softmax/logits/MatMul, no bias
    expected_spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    h, w, c = 3, 5, 2  # one element by hand: feature index (h * 17 + w) * 7 + c
    assert expected_spatial[0, (h * 17 + w) * 7 + c] == mixed_6_conv[0, c, h, w]
    # float32 through 17 layers vs float64, as max|difference| / max|float64 value| on these inputs:
    # measured 3.0e-6 (spatial), 5.0e-7 (features), 5.8e-7 (logits) with 1 and 2 threads on the
    # 2-vCPU Sapphire Rapids Xeon; the bound, 1e-5, is about three times the largest.
    for key, expected in (("spatial", expected_spatial), ("features", pool), ("logits", logits_unbiased)):
        scale = float(expected.abs().max())
        assert scale > 0 and torch.allclose(out[key].double(), expected, rtol=0, atol=1e-5 * scale), key
    # The check can fail: the next block's 1x1 branch (TF mixed_7/conv) gives other numbers.
    wrong = next_block[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert not torch.allclose(out["spatial"].double(), wrong, rtol=0, atol=1e-2 * float(wrong.abs().max()))


def _double_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    twin = copy.deepcopy(module)
    twin._forward_hooks.clear()
    for child in twin.modules():
        child._forward_hooks.clear()
    return twin.double().eval()


# ---------------------------------------------------------------------------------------------
# Inception Score and precision/recall against independent float64 computations


def inception_score_scipy(logits: np.ndarray, split_size: int) -> float:
    scores = []
    for start in range(0, len(logits), split_size):
        p = scipy.special.softmax(logits[start: start + split_size], axis=1)
        marginal = p.mean(axis=0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in p])))
    return float(np.mean(scores))


def test_inception_score_is_adms_consecutive_splits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(23, 12)) * 3
    mean, std, splits = adm.inception_score(logits, split_size=10)  # splits of 10, 10, 3 in order
    assert splits == 3 and std > 0
    # float64 on both sides; only the order of the sums differs: 1e-12 relative.
    assert mean == pytest.approx(inception_score_scipy(logits, 10), rel=1e-12)
    assert adm.inception_score(logits)[2] == 1  # ADM's split of 5,000: one split for N < 5,000
    # Closed forms: one class per sample, K classes equally often -> K; identical rows -> 1.
    one_hot = np.eye(12)[np.arange(24) % 12] * 60.0
    assert adm.inception_score(one_hot, 24)[0] == pytest.approx(12.0, rel=1e-9)
    assert adm.inception_score(np.tile(logits[:1], (8, 1)), 8)[0] == pytest.approx(1.0, abs=1e-12)


def precision_recall_float64(reference: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al.'s definition by brute force: full float64 distance matrices, full sorts."""
    ref_radius = np.sort(cdist(reference, reference), axis=1)[:, k]
    gen_radius = np.sort(cdist(samples, samples), axis=1)[:, k]
    between = cdist(samples, reference)
    precision = np.mean([(between[j] <= ref_radius).any() for j in range(len(samples))])
    recall = np.mean([(between[:, i] <= gen_radius).any() for i in range(len(reference))])
    return float(precision), float(recall)


def test_precision_recall_match_a_float64_brute_force():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 16))
    samples = rng.normal(size=(250, 16)) * 1.3 + 0.4
    expected = precision_recall_float64(reference, samples)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # neither trivial
    # The definition, with float32 distances (half=False): they decide the same way as float64
    # unless a point lies within rounding (~1e-6 relative) of a radius, which does not happen here.
    assert adm.precision_recall(reference, samples, batch=64, half=False) == expected
    with pytest.raises(ValueError, match="needs more than 3 points"):
        adm.precision_recall(reference[:3], samples)


# ADM's DistanceBlock, written independently in numpy float16: features cast to float16, squares
# rounded to float16 and summed in float32, the float16 dot products accumulated in float32, each
# elementwise step rounded to float16; a block with any non-finite distance is computed again in
# float32. Blocks of `batch` rows x `batch` columns (ADM: 10,000), np.partition as ADM's radii.

def adm_block_np(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
    nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
    dot = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is what the fallback detects
        d16 = np.maximum(nu[:, None] - np.float16(2) * dot + nv[None, :], np.float16(0))
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    u, v = u.astype(np.float32), v.astype(np.float32)
    return np.maximum(np.square(u).sum(1)[:, None] - 2 * (u @ v.T) + np.square(v).sum(1)[None, :], 0)


def adm_precision_recall_np(ref: np.ndarray, gen: np.ndarray, batch: int, k: int = 3):
    def radii(x):
        out = np.zeros(len(x), np.float32)
        for i in range(0, len(x), batch):
            row = np.concatenate([adm_block_np(x[i:i + batch], x[j:j + batch]) for j in range(0, len(x), batch)], 1)
            out[i:i + batch] = np.partition(row, np.arange(k + 1), axis=1)[:, k]
        return out
    r_ref, r_gen = radii(ref), radii(gen)
    ref_in, gen_in = np.zeros(len(ref), bool), np.zeros(len(gen), bool)
    for i in range(0, len(ref), batch):
        for j in range(0, len(gen), batch):
            d = adm_block_np(ref[i:i + batch], gen[j:j + batch])
            ref_in[i:i + batch] |= (d <= r_gen[None, j:j + batch]).any(1)
            gen_in[j:j + batch] |= (d <= r_ref[i:i + batch, None]).any(0)
    return float(gen_in.mean()), float(ref_in.mean())


def gaussian_features(seed: int, n: int = 2000, dim: int = 64, step: float = 2.0 ** -6):
    """Reference N(0, I) and samples N(0.3, 1.2^2 I), rounded to multiples of `step` (float16
    values whose float32 dot products are exact in any summation order, so a BLAS's order cannot
    flip a float16 rounding and both implementations must agree exactly)."""
    rng = np.random.default_rng(seed)
    ref, gen = rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) * 1.2 + 0.3
    return (np.round(ref / step) * step).astype(np.float32), (np.round(gen / step) * step).astype(np.float32)


def test_precision_recall_equal_adms_float16_computation_on_gaussian_features():
    ref, gen = gaussian_features(4)
    expected = adm_precision_recall_np(ref, gen, batch=adm.PR_BLOCK)
    got = adm.precision_recall(ref, gen)
    assert got == expected  # counts out of 2,000: equal to the last digit ADM prints
    # float32 distances (the harness before) decide differently on this data: float16 matters
    f32 = adm.precision_recall(ref, gen, half=False)
    assert max(abs(got[0] - f32[0]), abs(got[1] - f32[1])) >= 1 / 2000, (got, f32)


def test_precision_recall_fall_back_to_float32_per_block_as_adm():
    """Rows scaled so that their squared norms overflow float16 (> 65,504): blocks that hold them
    are computed in float32, the others stay float16, with blocks of 250 (ADM: 10,000)."""
    ref, gen = gaussian_features(5, n=600, dim=64)
    ref[:100] *= 40.0  # |x|^2 ~ 64 x 1,600: inf in float16; only the first row block of ref
    gen[450:] *= 40.0
    block = adm.adm_distances(torch.from_numpy(ref[:250]), torch.from_numpy(gen[:250]))
    assert torch.equal(block, torch.from_numpy(adm_block_np(ref[:250], gen[:250])))
    assert torch.equal(block, adm.adm_distances(torch.from_numpy(ref[:250]), torch.from_numpy(gen[:250]),
                                                half=False))  # the fallback: float32
    quiet = adm.adm_distances(torch.from_numpy(ref[250:500]), torch.from_numpy(gen[:250]))
    assert torch.equal(quiet, torch.from_numpy(adm_block_np(ref[250:500], gen[:250])))
    assert torch.equal(quiet, quiet.half().float())  # float16 values: no fallback there
    assert adm.precision_recall(ref, gen, batch=250) == adm_precision_recall_np(ref, gen, batch=250)


def test_tf32_is_off_while_evaluation_features_are_computed(tmp_path):
    """On CPU the flags change nothing numerically, but the context must set and restore them."""
    from bench.evaluate.features import ModuleFeatures, tf32_off
    from bench.evaluate.reference import Reference
    from bench.evaluate.score_run import compute_metrics

    seen = []

    class Pixels(torch.nn.Module):
        def features(self, images):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return images.float().flatten(1)

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True  # as training sets them
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with tf32_off():
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                raise RuntimeError("inside")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
        rng = np.random.default_rng(6)
        real = rng.integers(0, 256, size=(20, 4, 4, 3), dtype=np.uint8)
        path = tmp_path / "shard-00000.npz"
        np.savez(path, images=real[:12], labels=np.zeros(12, np.int64))
        network = ModuleFeatures(Pixels(), "pixels", feature_dim=48)
        seen.clear()
        compute_metrics(["prc"], network, Reference(np.zeros(48), np.eye(48), {}, real), "native", [path], "pixels")
        assert seen and all(flags == (False, False) for flags in seen)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_precision_recall_orientation_mode_collapse():
    """A generator that copies 5 real images over and over is precise (every sample lies on the
    real manifold) and has no recall (5 of 300 real points are covered). Swapping the arguments
    would give the opposite, so this fails if the convention changes."""
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(300, 16))
    collapsed = reference[rng.choice(300, 5, replace=False)][rng.integers(0, 5, 400)]
    precision, recall = adm.precision_recall(reference, collapsed)
    assert precision == 1.0 and recall <= 5 / 300 + 1e-12
    swapped = adm.precision_recall(collapsed, reference)
    assert swapped[0] < 0.1 and swapped[1] == 1.0  # what the wrong order would report


def test_precision_recall_orientation_through_bench_evals_code_path(tmp_path):
    """The same mode collapse through `compute_metrics`, the function `bench eval` calls, with
    shards on disk and a reference of real images: precision ~1, recall ~0."""
    from bench.evaluate.features import ModuleFeatures
    from bench.evaluate.reference import Reference
    from bench.evaluate.score_run import compute_metrics

    class Pixels(torch.nn.Module):  # features = the pixels: copies of an image are that image
        def features(self, images):
            return images.float().flatten(1)

    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, size=(60, 8, 8, 3), dtype=np.uint8)
    collapsed = real[rng.integers(0, 3, 40)]  # 40 samples, copies of 3 real images
    shards = []
    for index, part in enumerate((collapsed[:24], collapsed[24:])):
        path = tmp_path / f"shard-{index:05d}.npz"
        np.savez(path, images=part, labels=np.zeros(len(part), np.int64))
        shards.append(path)
    network = ModuleFeatures(Pixels(), "pixels", feature_dim=192)
    reference = Reference(np.zeros(192), np.eye(192), {}, real)
    rows = compute_metrics(["prc"], network, reference, "native", shards, "pixels")
    values = {name: value for name, _, value, _, _ in rows}
    assert values == {"precision_pixels": 1.0, "recall_pixels": pytest.approx(3 / 60, abs=1e-12)}


# ---------------------------------------------------------------------------------------------
# The reference batch


def test_adm_reference_identity_and_config_names_agree():
    """One table of reference batches: the config accepts its names and refuses others, and ADM's
    evaluator identifies files by its SHA-256s."""
    from bench.config import ADM_IMAGENET256, REFERENCE_BATCHES, ConfigError, EvalConfig

    assert adm.REFERENCE_BATCHES is REFERENCE_BATCHES
    assert EvalConfig(expected_reference="adm-imagenet256").expected_reference == "adm-imagenet256"
    with pytest.raises(ConfigError, match=r"eval.expected_reference='adm-imagenet512' .*\['adm-imagenet256'\]"):
        EvalConfig(expected_reference="adm-imagenet512")
    batch = ADM_IMAGENET256
    assert batch.filename == "VIRTUAL_imagenet256_labeled.npz" and batch.url.endswith(batch.filename)
    assert len(batch.sha256) == 64 and int(batch.sha256, 16) > 0
    assert adm.identify_reference(batch.sha256) == "adm-imagenet256"
    assert adm.identify_reference("0" * 64) is None


def test_spatial_statistics_come_from_mu_s_sigma_s_of_an_adm_batch(inception, tmp_path):
    """An ADM batch's precomputed sFID statistics are read for the spatial network, its FID
    statistics for pool3; a batch without them gets the features of its images."""
    rng = np.random.default_rng(4)
    path = tmp_path / "ref.npz"
    mu, mu_s = rng.normal(size=2048), rng.normal(size=adm.SPATIAL_DIM)
    np.savez(path, arr_0=_images(5, 4).permute(0, 2, 3, 1).numpy(), mu=mu, sigma=np.eye(2048),
             mu_s=mu_s, sigma_s=np.eye(adm.SPATIAL_DIM) * 2)
    got_mu, _, pool = reference_statistics(path, inception, tmp_path / "cache", image_size=64)
    got_mu_s, got_sigma_s, spatial = reference_statistics(path, inception.spatial, tmp_path / "cache",
                                                          image_size=64)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_mu_s, mu_s)
    assert got_sigma_s[0, 0] == 2 and spatial["statistics_source"] == "precomputed mu_s/sigma_s in the npz"
    images_only = tmp_path / "images.npz"
    images = _images(6, 4)
    np.savez(images_only, arr_0=images.permute(0, 2, 3, 1).numpy())
    own_mu_s, _, own = reference_statistics(images_only, inception.spatial, tmp_path / "cache",
                                            allow_rank_deficient=True)
    assert own["statistics_source"].startswith("features") and own["n_reference"] == 4
    np.testing.assert_allclose(own_mu_s, inception.outputs(images)["spatial"].double().mean(0).numpy(),
                               rtol=1e-6, atol=1e-9)


def test_expected_reference_missing_or_another_file(tmp_path, monkeypatch):
    """eval.expected_reference=adm-imagenet256: an unset or absent eval.reference is one error
    naming the setting, the file and its URL; a file is identified by its SHA-256 (here a stand-in
    registered as ADM's), and any other file is evaluated with a warning, recorded as not ADM's."""
    from bench.config import REFERENCE_BATCHES, EvalConfig, ExperimentConfig, ReferenceBatch
    from bench.evaluate.reference import ReferenceBatchError, identify, reference_file

    def config(**fields) -> ExperimentConfig:
        return ExperimentConfig(eval=EvalConfig(expected_reference="adm-imagenet256", **fields))

    with pytest.raises(ReferenceBatchError, match="eval.reference is not set; .*VIRTUAL_imagenet256_labeled.npz"
                       ".*eval.expected_reference=adm-imagenet256.*https://openaipublic"):
        reference_file(config())
    with pytest.raises(ReferenceBatchError, match="eval.reference=.*absent.npz does not exist; .*VIRTUAL_imagenet256"):
        reference_file(config(reference=str(tmp_path / "absent.npz")))
    assert reference_file(ExperimentConfig()) is None  # no expectation: the test split

    stand_in = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(stand_in, mu=np.zeros(2), sigma=np.eye(2))
    registered = ReferenceBatch("adm-imagenet256", stand_in.name, sha256_file(stand_in), 0, "file://")
    monkeypatch.setitem(REFERENCE_BATCHES, "adm-imagenet256", registered)
    facts = identify(stand_in, "adm-imagenet256")
    assert facts["reference_is_adm"] and facts["reference_batch"] == "adm-imagenet256"
    assert facts["reference_sha256"] == registered.sha256 and facts["reference_source"] == str(stand_in.resolve())
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.ones(2), sigma=np.eye(2))
    with pytest.warns(RuntimeWarning, match="not the published VIRTUAL_imagenet256_labeled.npz"):
        facts = identify(other, "adm-imagenet256")
    assert facts["reference_is_adm"] is False and facts["reference_batch"] is None


def test_the_paper_scale_evaluates_adms_five_metrics_against_adms_reference():
    from bench.compose import load_config
    from bench.launch.jobs import metric_names

    cfg = load_config(["scale=paper"])
    assert cfg.eval.feature_network == "inception" and cfg.eval.expected_reference == "adm-imagenet256"
    assert metric_names(cfg) == ["fid", "sfid", "is", "precision", "recall"]
