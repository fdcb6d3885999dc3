"""metrics.py: Inception FID plumbing (torchmetrics with a small random feature network, so no
weights download), clean-fid's resize, the cached reference statistics, the offline answer, the
pixel judge of the shapes data and the seed spread."""
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import metrics
import sample


class TinyFeatures(torch.nn.Module):
    """A random stand-in for Inception: (B, 3, 299, 299) uint8 -> (B, 16) features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=13, stride=13)
        torch.nn.init.normal_(self.conv.weight, std=0.05)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean((2, 3))           # (B, 16)


@pytest.fixture
def features():
    torch.manual_seed(0)
    return TinyFeatures().requires_grad_(False)


def shapes(seed, n):
    return torch.stack([data.ShapesDataset(32, seed=seed)[i][0] for i in range(n)])  # (n, 3, 32, 32)


def test_the_weights_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    assert metrics.INCEPTION_URL == URL_INCEPTION_V3


def test_fid_images_resize_like_clean_fid():
    """clean-fid's 'clean' mode, written out with PIL: each channel as a float image, bicubic to
    299 x 299, clipped to [0, 255]. Ours rounds to 8 bits at the end: at most one level apart."""
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ours = metrics.fid_images(images).numpy().astype(np.float64)          # (3, 3, 299, 299)
    assert ours.shape == (3, 3, 299, 299)
    pixels = ((images + 1) * 127.5).round().numpy()                       # the 8-bit images
    for b in range(3):
        for c in range(3):
            channel = Image.fromarray(pixels[b, c].astype(np.float32), mode="F")
            theirs = np.asarray(channel.resize((299, 299), resample=Image.BICUBIC)).clip(0, 255)
            assert np.abs(ours[b, c] - theirs).max() <= 0.5 + 1e-3, (b, c)


def test_fid_with_a_custom_network_equals_the_frechet_distance_of_its_features(features, tmp_path):
    """torchmetrics' FID (sums and eigvals) against metrics.frechet_distance (eigh) on the same
    features; the FID of the real images against themselves is 0."""
    ds = data.ShapesDataset(32, seed=1)
    fid = metrics.InceptionFID(feature=features)
    assert fid.name == "tinyfeatures"
    fid.reference(ds, 40, seed=5, paths=[str(tmp_path / "stats.pt")])
    reals, _ = metrics.eval_pairs(ds, 40, seed=5)
    fakes = shapes(seed=9, n=30) * 0.7                                   # other images, duller
    expected = metrics.frechet_distance(features(metrics.fid_images(fakes)), features(metrics.fid_images(reals)))
    assert expected > 1e-3
    assert fid.score(fakes) == pytest.approx(expected, rel=1e-4)
    assert abs(fid.score(reals)) < 1e-4 * expected                       # the generated side is reset


def test_reference_statistics_are_cached_and_keyed(features, tmp_path, monkeypatch):
    ds = data.ShapesDataset(32, seed=1)
    first, second = str(tmp_path / "data" / "stats.pt"), str(tmp_path / "run" / "stats.pt")
    fakes = shapes(seed=9, n=12)
    fid = metrics.InceptionFID(feature=features)
    assert fid.reference(ds, 16, paths=[first, second]) == first and os.path.isfile(first)
    score = fid.score(fakes)
    # a second evaluation reads the file: no real image is decoded
    real_eval_pairs = metrics.eval_pairs
    monkeypatch.setattr(metrics, "eval_pairs", lambda *a, **k: pytest.fail("recomputed"))
    again = metrics.InceptionFID(feature=features)
    assert again.reference(ds, 16, paths=[first, second]) == first and again.n_real == 16
    assert again.score(fakes) == pytest.approx(score, rel=1e-6)
    # other data, another count: computed anew (over the stale file)
    calls = []
    monkeypatch.setattr(metrics, "eval_pairs", lambda *a, **k: calls.append(a[1]) or real_eval_pairs(*a, **k))
    metrics.InceptionFID(feature=features).reference(data.ShapesDataset(32, seed=2), 16, paths=[first])
    metrics.InceptionFID(feature=features).reference(ds, 12, paths=[first])
    assert calls == [16, 12]


def test_a_read_only_data_folder_caches_in_the_run_directory(features, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, path, *a, **k):
        if os.path.basename(os.path.dirname(str(path))) == "data":
            raise PermissionError(13, "Permission denied", str(path))
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    paths = [str(tmp_path / "data" / "stats.pt"), str(tmp_path / "run" / "stats.pt")]
    assert metrics.InceptionFID(feature=features).reference(data.ShapesDataset(32), 8, paths=paths) == paths[1]


def test_stats_paths_next_to_the_data(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    name = "fid_stats_inception_64px_n100_seed7.pt"
    assert metrics.fid_stats_paths(str(folder), "run", "inception", 64, 100, 7) == [str(folder / name), f"run/{name}"]
    assert metrics.fid_stats_paths("sh/{0..9}.tar", "run", "inception", 64, 100, 7) == [f"sh/{name}", f"run/{name}"]
    assert metrics.fid_stats_paths("shapes", "run", "inception", 64, 100, 7) == [f"run/{name}"]


def test_offline_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    """No weights in the cache and no network: FIDUnavailable names the flag, and the download
    was tried with a short socket timeout (torch.hub's has none), restored afterwards."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metrics, "INCEPTION_URL", "https://weights.invalid/weights-inception-2015-12-05-6726825d.pth")
    seen = []
    real_download = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: seen.append(socket.getdefaulttimeout()) or real_download(*a, **k))
    before = socket.getdefaulttimeout()
    with pytest.raises(metrics.FIDUnavailable) as err:
        metrics.inception_weights("--no-fid")
    message = str(err.value)
    assert "\n" not in message and message.endswith("or pass --no-fid") and "hub/checkpoints" in message
    assert seen == [metrics.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before
    assert not os.listdir(tmp_path / "torch" / "hub" / "checkpoints")    # no partial file left
    # a file in the cache is used as it is, with no network
    path = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"x")
    assert metrics.inception_weights("--no-fid") == str(path)


def random_inception_weights(path, monkeypatch):
    """torch-fidelity's Inception v3 with its random initial weights, saved where torch.hub
    keeps the real ones: the real network's code path, without the download."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_the_inception_network_from_the_hub_cache(tmp_path, monkeypatch):
    """The default network: weights from $TORCH_HOME/hub/checkpoints (random here), 2048 features,
    reference cached with the name 'inception'."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    random_inception_weights(tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(metrics.INCEPTION_URL),
                             monkeypatch)
    ds = data.ShapesDataset(32, seed=1)
    fid = metrics.prepare_fid(ds, "shapes", str(tmp_path / "run"), 6, seed=0)
    assert fid.name == "inception" and fid.metric.real_features_sum.shape == (2048,)
    assert (tmp_path / "run" / "fid_stats_inception_32px_n6_seed0.pt").is_file()
    value = fid.score(shapes(seed=9, n=6))
    assert np.isfinite(value) and value > 0


def test_sample_reexports_the_metrics():
    for name in ("frechet_distance", "shapes_alignment", "SHAPES_ATTRIBUTES", "eval_pairs", "eval_metrics",
                 "clip_score", "embed_images", "EVAL_SEED"):
        assert getattr(sample, name) is getattr(metrics, name), name


# ---------------------------------------------------------------------------- the pixel judge


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_accuracy_on_clean_images(resolution):
    ds = data.ShapesDataset(resolution, seed=11)     # a seed no threshold was tuned on
    images = torch.stack([ds[i][0] for i in range(400)])
    judged = metrics.judge_shapes_image(images)
    correct = sum(j == ds.attributes(i) for i, j in enumerate(judged))
    print(f"judge accuracy at {resolution} px: {correct}/400")
    assert correct / 400 >= 0.995


def _blur(x, sigma):
    k = 2 * int(math.ceil(3 * sigma)) + 1
    t = torch.arange(k) - k // 2
    g = torch.exp(-t.double() ** 2 / (2 * sigma ** 2)).float()
    g = g / g.sum()
    x = F.pad(x, (k // 2,) * 4, mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, k).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, g.view(1, 1, k, 1).repeat(3, 1, 1, 1), groups=3)


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_tolerates_blur_and_noise(resolution):
    ds = data.ShapesDataset(resolution, seed=12)
    images = torch.stack([ds[i][0] for i in range(200)])
    images = _blur(images, 0.6 * resolution / 32)
    images = (images + 0.05 * torch.randn_like(images)).clamp(-1, 1)
    judged = metrics.judge_shapes_image(images)
    correct = sum(j == ds.attributes(i) for i, j in enumerate(judged))
    assert correct / 200 >= 0.95


def test_judge_never_crashes_on_garbage():
    garbage = [torch.rand(3, 32, 32) * 2 - 1, torch.zeros(3, 32, 32), torch.ones(3, 64, 64),
               torch.full((3, 32, 32), float("nan")), torch.rand(3, 1, 1), torch.rand(3, 2, 7),
               torch.randn(3, 32, 32) * 100]
    for x in garbage:
        a, info = metrics.judge_shapes_image(x, details=True)
        assert a["shape"] in data.SHAPES and a["color"] in data.COLORS
        assert a["background"] in data.COLORS and a["color"] != a["background"]
        assert a["size"] in data.SIZES and a["position"] in data.POSITIONS
        assert set(info) >= {"fill", "height", "cx", "skew", "found"}
    assert metrics.judge_shapes_image(torch.zeros(3, 32, 32), details=True)[1]["found"] is False
    assert len(metrics.judge_shapes_image(torch.zeros(2, 3, 16, 16))) == 2


# ---------------------------------------------------------------------------- seed spread


def spread_images(captions, n_z, seed):
    """n_z fresh draws of the data's jitter for each caption: what a G as varied as the data makes."""
    return torch.stack([data.jittered_shapes(data.parse_shapes_caption(c), n_z, 32, seed=seed + p)
                        for p, c in enumerate(captions)])                  # (P, n_z, 3, 32, 32)


def drawn(caption, cxs, cys, extents):
    """Images of one caption's shape at the given centres and extents (no colour jitter). (n, 3, 32, 32)"""
    attrs = data.parse_shapes_caption(caption)
    fg, bg = (torch.tensor(data.COLORS[attrs[k]], dtype=torch.float32)[:, None, None] for k in ("color", "background"))
    images = []
    for cx, cy, extent in zip(cxs, cys, extents):
        cov = torch.from_numpy(data.shape_coverage(attrs["shape"], extent, cx, cy, 32)).float()  # (32, 32)
        images.append((bg + cov * (fg - bg)) / 127.5 - 1)
    return torch.stack(images)


def test_seed_spread_of_real_draws_is_near_one():
    captions = data.shapes_prompts_grid(n=6)
    out = metrics.seed_spread(spread_images(captions, 16, seed=100), captions)   # reference: seeds 0..5
    assert out["spread_captions"] == 6
    for k in ("spread_x", "spread_y", "spread_size"):
        assert 0.75 < out[k] < 1.3, out


def test_seed_spread_of_one_image_per_caption_is_zero():
    captions = data.shapes_prompts_grid(n=4)
    one = spread_images(captions, 1, seed=100).expand(-1, 8, -1, -1, -1)           # the same image 8 times
    out = metrics.seed_spread(one, captions)
    assert out == {"spread_x": 0.0, "spread_y": 0.0, "spread_size": 0.0, "spread_captions": 4}


def test_seed_spread_reads_each_axis_on_its_own():
    caption = "a large red circle in the middle of a green background"
    n = 8
    varied = torch.linspace(-0.04, 0.04, n).tolist()                              # the data's x jitter
    only_x = drawn(caption, [0.5 + d for d in varied], [0.5] * n, [0.6] * n)
    out = metrics.seed_spread(only_x[None], [caption])
    assert out["spread_x"] > 0.5 and out["spread_y"] < 0.05 and out["spread_size"] < 0.25, out
    only_y = drawn(caption, [0.5] * n, [0.5 + 2.5 * d for d in varied], [0.6] * n)
    out = metrics.seed_spread(only_y[None], [caption])
    assert out["spread_y"] > 0.5 and out["spread_x"] < 0.05 and out["spread_size"] < 0.25, out  # size: pixel phase


def test_seed_spread_leaves_out_samples_of_the_wrong_shape():
    caption = "a large red circle in the middle of a green background"
    square = caption.replace("circle", "square")
    right = drawn(caption, [0.5] * 6, [0.5] * 6, [0.6] * 6)                       # 6 identical circles
    wrong = drawn(square, [0.4, 0.6], [0.4, 0.6], [0.45, 0.6])                     # 2 varied squares
    out = metrics.seed_spread(torch.cat([right, wrong])[None], [caption])
    assert out == {"spread_x": 0.0, "spread_y": 0.0, "spread_size": 0.0, "spread_captions": 1}
    # fewer than 3 right shapes: the caption does not count
    few = torch.cat([right[:2], drawn(square, [0.3, 0.5, 0.7] * 2, [0.5] * 6, [0.6] * 6)])
    assert metrics.seed_spread(few[None], [caption])["spread_captions"] == 0
