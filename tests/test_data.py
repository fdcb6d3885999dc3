"""Tests for data.py: the shapes spec, the judge, folder and shard loaders, bad input.

Fixtures (images, captions, tar shards) are written by the tests into tmp_path.
"""
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data

# -----------------------------------------------------------------------------
# shapes: vocabulary and spec conformance


def test_vocabulary_matches_the_spec():
    assert data.SHAPES == ("circle", "square", "triangle")
    assert data.COLORS == {
        "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
        "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
        "white": (245, 245, 245), "black": (20, 20, 20)}
    assert data.SIZES == {"small": 0.3, "large": 0.6}
    assert data.POSITIONS == {"left": 0.3, "center": 0.5, "right": 0.7}
    assert len(data.CAPTION_TEMPLATES) >= 4


def _measure(image, fg, bg):
    """Independent measurement: alpha = position of each pixel on the bg -> fg line."""
    rgb = (image.double().numpy() + 1) * 127.5                                # (3, H, W)
    v = fg - bg
    alpha = np.einsum("chw,c->hw", rgb - bg[:, None, None], v) / (v @ v)     # (H, W)
    return np.clip(alpha, 0, 1)


def test_the_caption_leaves_the_height_open():
    """y is uniform over every height that fits: a small shape from about 0.22 to 0.78 of the way
    down, a large one 0.34 to 0.66, whatever the caption says; no jitter puts it at 0.5."""
    ds = data.ShapesDataset(32, seed=5)
    ys = {"small": [], "large": []}
    for i in range(2000):
        ys[ds.attributes(i)["size"]].append(ds.render_params(i)["cy"])
    small, large = np.array(ys["small"]), np.array(ys["large"])
    assert small.min() < 0.24 and small.max() > 0.76 and 0.2 < small.min()
    assert 0.33 < large.min() < 0.37 and 0.63 < large.max() < 0.67
    # uniform: each third of a small shape's range holds about a third of the draws
    thirds = np.histogram(small, bins=3, range=(0.5 - 0.28, 0.5 + 0.28))[0] / len(small)
    assert np.abs(thirds - 1 / 3).max() < 0.05, thirds
    # one caption's own draws (the reference of metrics.seed_spread) spread as widely
    attrs = dict(shape="circle", color="red", background="blue", size="small", position="left")
    info = [i for _, i in data.judge_shapes_image(data.jittered_shapes(attrs, 32, 32), details=True)]
    assert np.std([i["cy"] for i in info]) > 0.1
    assert data.ShapesDataset(32, seed=5, jitter=False).render_params(0)["cy"] == 0.5


@pytest.mark.parametrize("resolution", [32, 64])
def test_rendered_images_follow_the_spec(resolution):
    ds = data.ShapesDataset(resolution, seed=3)
    R, tol = resolution, 1.0 / resolution   # one pixel of measurement slack
    for i in range(150):
        image, caption = ds[i]
        a, p = ds.attributes(i), ds.render_params(i)
        assert image.shape == (3, R, R) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert a["color"] != a["background"]
        # colours: the rendered colours are palette colours jittered by at most 8 per channel
        assert np.abs(p["fg"] - np.array(data.COLORS[a["color"]])).max() <= 8
        assert np.abs(p["bg"] - np.array(data.COLORS[a["background"]])).max() <= 8
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], 1)
        bg_measured = (border.median(1).values.double().numpy() + 1) * 127.5
        assert np.abs(bg_measured - np.array(data.COLORS[a["background"]])).max() <= 8 + 1e-3
        # continuous parameters within the jitter bounds
        assert abs(p["extent"] / data.SIZES[a["size"]] - 1) <= 0.1 + 1e-9
        assert abs(p["cx"] - data.POSITIONS[a["position"]]) <= 0.04 + 1e-9
        assert abs(p["cy"] - 0.5) + p["extent"] / 2 <= data.VERTICAL_LIMIT + 1e-9   # any height that fits
        # geometry measured from pixels
        alpha = _measure(image, p["fg"], p["bg"])
        assert alpha.max() > 0.99                        # a solid interior exists
        rows = np.nonzero(alpha.max(1) > 0.5)[0]
        height = (rows[-1] - rows[0] + 1) / R
        lo, hi = 0.9 * data.SIZES[a["size"]], 1.1 * data.SIZES[a["size"]]
        assert lo - 2 * tol <= height <= hi + tol, (caption, height)
        y_box = (rows[0] + rows[-1] + 1) / 2 / R
        assert abs(y_box - p["cy"]) <= tol, (caption, y_box, p["cy"])
        assert rows[0] / R >= 0.5 - data.VERTICAL_LIMIT - tol and (rows[-1] + 1) / R <= 0.5 + data.VERTICAL_LIMIT + tol
        cx = (alpha.sum(0) * (np.arange(R) + 0.5)).sum() / alpha.sum() / R
        # large shapes at left/right may be clipped by the border, pulling the centroid inwards
        clip_slack = 0.03 if a["size"] == "large" else 0.0
        assert abs(cx - data.POSITIONS[a["position"]]) <= 0.04 + tol + clip_slack, (caption, cx)
        clipped = p["cx"] - p["extent"] / 2 < 0 or p["cx"] + p["extent"] / 2 > 1
        if not clipped:   # area of the anti-aliased shape = analytic area
            k = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[a["shape"]]
            assert alpha.sum() / R ** 2 == pytest.approx(k * p["extent"] ** 2, rel=0.06)


def test_anti_aliasing_and_any_resolution():
    for R in (17, 48, 128):
        ds = data.ShapesDataset(R, seed=1)
        image, _ = ds[0]
        p = ds.render_params(0)
        assert image.shape == (3, R, R)
        alpha = _measure(image, p["fg"], p["bg"])
        assert ((alpha > 0.05) & (alpha < 0.95)).any(), "edges must have intermediate values"
    # coverage converges to the analytic area (disc of diameter 0.5: pi/16)
    cov = data.shape_coverage("circle", 0.5, 0.5, 0.5, 256)
    assert cov.mean() == pytest.approx(math.pi / 16, rel=1e-3)
    tri = data.shape_coverage("triangle", 0.5, 0.5, 0.5, 256)
    assert tri.mean() == pytest.approx(0.125, rel=1e-3)
    assert tri[64:70].sum() < tri[186:192].sum()     # apex at the top, base at the bottom


def test_no_jitter_renders_exact_palette_and_geometry():
    ds = data.ShapesDataset(32, seed=0, jitter=False)
    for i in range(20):
        a, p = ds.attributes(i), ds.render_params(i)
        assert tuple(p["fg"]) == data.COLORS[a["color"]]
        assert p["extent"] == data.SIZES[a["size"]] and p["cy"] == 0.5
    assert data.ShapesDataset(32, jitter=True).attributes(5) == ds.attributes(5)


def test_attribute_and_template_coverage():
    ds = data.ShapesDataset(32, seed=0)
    seen = {k: set() for k in ("shape", "color", "background", "size", "position")}
    templates = set()
    for i in range(600):
        a = ds.attributes(i)
        assert a["color"] != a["background"]
        for k in seen:
            seen[k].add(a[k])
        templates.add(ds.render_params(i)["template"])
    assert seen["shape"] == set(data.SHAPES) and seen["size"] == set(data.SIZES)
    assert seen["color"] == seen["background"] == set(data.COLORS)
    assert seen["position"] == set(data.POSITIONS)
    assert templates == set(range(len(data.CAPTION_TEMPLATES)))


def test_determinism():
    a, b = data.ShapesDataset(32, seed=5), data.ShapesDataset(32, seed=5)
    _ = a[3]                                               # access order must not matter
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == b[7][1]
    assert torch.equal(a[-1][0], a[len(a) - 1][0])
    other = data.ShapesDataset(32, seed=6)
    assert sum(not torch.equal(a[i][0], other[i][0]) for i in range(10)) >= 9
    with pytest.raises(IndexError):
        a[len(a)]


# -----------------------------------------------------------------------------
# captions


def _all_attrs():
    for shape, color, bg, size, pos in itertools.product(
            data.SHAPES, data.COLORS, data.COLORS, data.SIZES, data.POSITIONS):
        if color != bg:
            yield dict(shape=shape, color=color, background=bg, size=size, position=pos)


def test_caption_grammar_and_parse_round_trip_for_every_template():
    examples = set()
    for t in range(len(data.CAPTION_TEMPLATES)):
        for attrs in _all_attrs():
            caption = data.shapes_caption(attrs, t)
            words = caption.replace(",", " ").replace("(", " ").replace(")", " ").split()
            i_color, i_shape = words.index(attrs["color"]), words.index(attrs["shape"])
            i_bg = len(words) - 1 - words[::-1].index(attrs["background"])
            assert i_color < i_shape < i_bg, caption
            assert attrs["size"] in words
            assert data.parse_shapes_caption(caption) == attrs, caption
        examples.add(caption)
    assert data.shapes_caption(dict(shape="circle", color="red", background="blue", size="large",
                                     position="left")) == \
        "a large red circle on the left of a blue background"
    assert data.shapes_caption(dict(shape="triangle", color="yellow", background="purple",
                                    size="small", position="right"), 1) == \
        "small yellow triangle, right side, purple backdrop"
    assert len(examples) == len(data.CAPTION_TEMPLATES)


def test_captions_say_an_before_a_vowel():
    orange = dict(shape="square", color="orange", background="white", size="small", position="center")
    assert data.shapes_caption(orange, 2) == "an orange square, small, in the center on white"
    assert data.shapes_caption(dict(orange, color="red", background="orange"), 0) == \
        "a small red square in the middle of an orange background"
    for t in range(len(data.CAPTION_TEMPLATES)):
        for attrs in _all_attrs():
            caption = data.shapes_caption(attrs, t)
            assert not re.search(r"\ba [aeiou]", caption) and not re.search(r"\ban [^aeiou]", caption), caption


def test_parse_partial_prompt_and_bad_attrs():
    assert data.parse_shapes_caption("A Red circle") == dict(
        shape="circle", color="red", background=None, size=None, position=None)
    assert data.parse_shapes_caption("a photo of a dog")["shape"] is None
    with pytest.raises(ValueError, match="shape"):
        data.shapes_caption(dict(shape="hexagon", color="red", background="blue", size="small",
                                 position="left"))
    with pytest.raises(ValueError, match="differ"):
        data.shapes_caption(dict(shape="circle", color="red", background="red", size="small",
                                 position="left"))


def test_dataset_captions_parse_to_attributes():
    ds = data.ShapesDataset(16, seed=2)
    for i in range(100):
        assert data.parse_shapes_caption(ds[i][1]) == ds.attributes(i)


def test_snapshot_prompts_are_fixed_and_varied():
    prompts = data.shapes_prompts_grid(9)
    assert prompts == data.shapes_prompts_grid(9) and len(prompts) == 9
    parsed = [data.parse_shapes_caption(p) for p in prompts]
    assert {p["shape"] for p in parsed} == set(data.SHAPES)
    assert {p["position"] for p in parsed} == set(data.POSITIONS)
    assert {p["size"] for p in parsed} == set(data.SIZES)


# -----------------------------------------------------------------------------
# the judge


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_accuracy_on_clean_images(resolution):
    ds = data.ShapesDataset(resolution, seed=11)     # a seed no threshold was tuned on
    images = torch.stack([ds[i][0] for i in range(400)])
    judged = data.judge_shapes_image(images)
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
    judged = data.judge_shapes_image(images)
    correct = sum(j == ds.attributes(i) for i, j in enumerate(judged))
    assert correct / 200 >= 0.95


def test_judge_never_crashes_on_garbage():
    garbage = [torch.rand(3, 32, 32) * 2 - 1, torch.zeros(3, 32, 32), torch.ones(3, 64, 64),
               torch.full((3, 32, 32), float("nan")), torch.rand(3, 1, 1), torch.rand(3, 2, 7),
               torch.randn(3, 32, 32) * 100]
    for x in garbage:
        a, info = data.judge_shapes_image(x, details=True)
        assert a["shape"] in data.SHAPES and a["color"] in data.COLORS
        assert a["background"] in data.COLORS and a["color"] != a["background"]
        assert a["size"] in data.SIZES and a["position"] in data.POSITIONS
        assert set(info) >= {"fill", "height", "cx", "skew", "found"}
    assert data.judge_shapes_image(torch.zeros(3, 32, 32), details=True)[1]["found"] is False
    assert len(data.judge_shapes_image(torch.zeros(2, 3, 16, 16))) == 2


# -----------------------------------------------------------------------------
# loaders on shapes


def test_two_dataloader_workers_render_exactly_the_samples_in_order():
    """Each index renders from its own seeded stream, so worker processes agree with ds[i]."""
    ds = data.ShapesDataset(32, seed=0, length=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batches = list(itertools.islice(loader, 2))
    expected = torch.stack([ds[i][0] for i in range(16)])
    assert torch.equal(torch.cat([b[0] for b in batches]), expected)
    assert list(batches[0][1]) == [ds[i][1] for i in range(8)]


# -----------------------------------------------------------------------------
# image folders


def _save(path, img, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)
    return path


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _noise(size, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3),
                                                               dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    """A small image-caption folder covering every colour mode and caption source."""
    root = tmp_path / "imgs"
    _save(str(root / "a_rgb.jpg"), _noise((80, 60)))
    _write(root / "a_rgb.txt", "  an rgb photo \n")
    _save(str(root / "b_grey.png"), Image.new("L", (40, 40), 128))
    _write(root / "b_grey.txt", "grey")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))              # fully transparent red
    _save(str(root / "c_rgba.png"), rgba)
    _write(root / "c_rgba.txt", "transparent")
    _save(str(root / "d_16bit.png"), Image.fromarray(np.full((40, 40), 65535, np.uint16)))
    _write(root / "d_16bit.txt", "sixteen bit white")
    _save(str(root / "e_palette.png"), Image.new("RGB", (40, 40), (0, 0, 255)).convert("P"))
    _write(root / "e_palette.txt", "palette blue")
    _save(str(root / "f_tiny.png"), Image.new("RGB", (8, 8), (0, 255, 0)))
    _write(root / "f_tiny.txt", "tiny green")
    _save(str(root / "nested" / "deeper" / "g.webp"), _noise((50, 70), 1))
    _save(str(root / "nested" / "h.JPEG"), _noise((64, 64), 2))
    _write(root / "captions.jsonl", json.dumps({"file": "nested/deeper/g.webp", "caption": "webp"})
           + "\n")
    _write(root / "captions.csv", "file,caption\nnested/h.JPEG,\"upper-case, csv\"\n")
    _write(root / "notes.md", "not an image")
    return root


def test_folder_loads_every_mode_and_caption_source(folder):
    ds = data.ImageCaptionFolder(folder, 32)
    captions = [ds[i][1] for i in range(len(ds))]
    assert captions == ["an rgb photo", "grey", "transparent", "sixteen bit white",
                        "palette blue", "tiny green", "upper-case, csv", "webp"]   # sorted walk
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
    assert torch.allclose(ds[2][0], torch.ones(3, 32, 32))     # transparent -> white
    assert torch.allclose(ds[3][0], torch.ones(3, 32, 32))     # 65535 -> 255 -> +1
    grey = ds[1][0]
    assert torch.equal(grey[0], grey[1]) and abs(grey.mean().item() - (128 / 127.5 - 1)) < 1e-4
    assert torch.allclose(ds[4][0][2], torch.ones(32, 32))     # palette blue
    assert torch.allclose(ds[5][0][1], torch.ones(32, 32), atol=1e-2)   # tiny, upsampled
    assert ds.n_upsampled == 1 and not ds.skipped
    assert len(data.ImageCaptionFolder(folder, 32, min_size=16)) == 7   # tiny skipped
    # 2 DataLoader workers over the folder
    images, caps = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)))
    assert images.shape == (8, 3, 32, 32) and list(caps) == captions


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))                    # blue middle third
    out = data.load_image(img, 16)
    assert torch.allclose(out[2], torch.ones(16, 16), atol=0.02)  # only the blue square remains


def test_folder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        data.ImageCaptionFolder(tmp_path / "nope", 32)
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty" / "readme.txt", "no images here")
    with pytest.raises(ValueError, match="no images") as e:
        data.ImageCaptionFolder(tmp_path / "empty", 32)
    assert "\n" not in str(e.value)


def test_folder_skips_uncaptioned_and_corrupt_images(tmp_path, caplog):
    root = tmp_path / "mixed"
    for k in range(3):
        _save(str(root / f"ok{k}.png"), _noise((32, 32), k))
        _write(root / f"ok{k}.txt", f"ok {k}")
    _save(str(root / "uncaptioned.png"), _noise((32, 32)))
    _write(root / "corrupt.png", "this is not a png")
    _write(root / "corrupt.txt", "corrupt")
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.ImageCaptionFolder(root, 16)
    assert len(ds) == 3
    assert ds.skipped["no caption"] == 1 and ds.skipped["unreadable"] == 1
    assert "uncaptioned.png" in caplog.text and "corrupt.png" in caplog.text


def test_folder_with_nothing_usable_is_an_error(tmp_path):
    root = tmp_path / "nocaps"
    _save(str(root / "a.png"), _noise((32, 32)))
    _save(str(root / "b.png"), _noise((32, 32)))
    with pytest.raises(ValueError, match="no usable images") as e:
        data.ImageCaptionFolder(root, 16)
    assert "\n" not in str(e.value)
    _write(root / "captions.jsonl", '{"name": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1"):
        data.ImageCaptionFolder(root, 16)


def _truncated_folder(root, n):
    """n captioned noise JPEGs in root, 1.jpg cut to 60%: it passes PIL's verify, fails to decode."""
    for k in range(n):
        _save(str(root / f"{k}.jpg"), _noise((64, 64), k), quality=95)
        _write(root / f"{k}.txt", f"image {k}")
    raw = (root / "1.jpg").read_bytes()
    (root / "1.jpg").write_bytes(raw[: int(len(raw) * 0.6)])
    return root


def test_truncated_image_is_substituted_not_a_worker_crash(tmp_path, caplog):
    root = _truncated_folder(tmp_path / "trunc", 4)
    ds = data.ImageCaptionFolder(root, 16)
    assert len(ds) + sum(ds.skipped.values()) == 4
    # break a file after the up-front check too: __getitem__ must substitute the next image
    _write(root / "2.jpg", "garbage")
    with caplog.at_level(logging.WARNING, logger="data"):
        captions = [ds[i][1] for i in range(len(ds))]
    assert ds.load_failures >= 1 and "using the next image" in caplog.text
    assert "image 2" not in captions
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data"):              # many more reads: no new warning
        for _ in range(5):
            [ds[i] for i in range(len(ds))]
    assert "could not decode" not in caplog.text and ds.load_failures == len(ds.undecodable)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2))   # no worker crash
    assert len(batches) == len(ds)


# -----------------------------------------------------------------------------
# webdataset shards


def _jpeg_bytes(seed):
    buf = io.BytesIO()
    _noise((48, 40), seed).save(buf, "JPEG")
    return buf.getvalue()


def _make_shards(root, n_shards=2, per_shard=6):
    """img2dataset layout; shard 0 also holds a corrupt image and an uncaptioned one."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            def add(name, payload):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                add(f"{key}.jpg", _jpeg_bytes(s * 100 + k))
                if k == 0:   # caption only in the json, as some img2dataset exports do
                    add(f"{key}.json", json.dumps({"caption": f"sample {key}"}).encode())
                else:
                    add(f"{key}.txt", f"sample {key}".encode())
                    add(f"{key}.json", json.dumps({"key": key}).encode())
                keys.append(f"sample {key}")
            if s == 0:
                add("bad00001.jpg", b"not a jpeg at all")
                add("bad00001.txt", b"broken")
                add("bad00002.jpg", _jpeg_bytes(999))
    return str(root / ("{00000..%05d}.tar" % (n_shards - 1))), keys


def test_shards_stream_everything_and_count_skips(tmp_path):
    pattern, keys = _make_shards(tmp_path / "shards")
    ds = data.webdataset_shards(pattern, 16, shuffle=0)
    samples = list(ds)
    assert sorted(c for _, c in samples) == sorted(keys)
    assert all(img.shape == (3, 16, 16) and img.abs().max() <= 1 for img, _ in samples)
    assert ds.skipped["undecodable image"] == 1 and ds.skipped["no caption"] == 1
    # a truncated shard: its complete samples stream, the read error is counted, no crash
    first = tmp_path / "shards" / "00001.tar"
    with tarfile.open(first) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000010003.jpg")
    first.write_bytes(first.read_bytes()[: cut.offset_data + cut.size // 2])  # mid-image
    ds = data.webdataset_shards(pattern, 16, shuffle=0)
    n = len(list(ds))
    assert len(keys) // 2 <= n < len(keys) and ds.skipped["tar read error"] >= 1


def test_shards_shuffle_is_seeded(tmp_path):
    pattern, keys = _make_shards(tmp_path / "shards")
    order = lambda seed, epoch=0: [c for _, c in _epoch(data.webdataset_shards(
        pattern, 16, shuffle=8, seed=seed), epoch)]
    assert order(0) == order(0) and sorted(order(0)) == sorted(keys)
    assert order(0) != order(1) and order(0) != order(0, epoch=1)


def _epoch(ds, epoch):
    ds.set_epoch(epoch)
    return list(ds)


def test_shards_split_by_worker_and_rank(tmp_path, monkeypatch):
    pattern, keys = _make_shards(tmp_path / "shards", n_shards=4, per_shard=3)
    ds = data.build_dataset(pattern, 16)
    assert isinstance(ds, data.WebDatasetShards)
    captions = [c for _, cs in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2) for c in cs]
    assert sorted(captions) == sorted(keys)                        # each sample exactly once
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append([c for _, c in data.webdataset_shards(pattern, 16)])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
    # more readers than shards: split by sample instead, still disjoint and complete
    monkeypatch.setenv("WORLD_SIZE", "8")
    union = []
    for rank in range(8):
        monkeypatch.setenv("RANK", str(rank))
        union += [c for _, c in data.webdataset_shards(pattern, 16)]
    assert sorted(union) == sorted(keys)


def test_missing_shards_are_a_clear_error(tmp_path):
    pattern, _ = _make_shards(tmp_path / "shards")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        data.webdataset_shards(pattern.replace("00001", "00003"), 16)


# -----------------------------------------------------------------------------
# build_dataset and the demo


def test_build_dataset_dispatch_and_errors(folder, tmp_path):
    assert isinstance(data.build_dataset("shapes", 32), data.ShapesDataset)
    assert isinstance(data.build_dataset(str(folder), 32), data.ImageCaptionFolder)
    for bad in [str(tmp_path / "missing"), "laion", str(folder / "a_rgb.jpg")]:
        with pytest.raises(ValueError, match="expected 'shapes'") as e:
            data.build_dataset(bad, 32)
        assert "\n" not in str(e.value)


def test_demo_runs(capsys):
    data.demo()
    out = capsys.readouterr().out
    assert "images/s" in out and "grid" in out


def test_shapes_hard_negatives_change_exactly_one_attribute():
    ds = data.ShapesDataset(32, seed=3)
    for i in range(20):
        caption, attrs = ds[i][1], ds.attributes(i)
        lists = data.shapes_hard_negatives(caption)
        assert len(lists) == 5  # one list per attribute, in the order shape, color, background, size, position
        for key, negs in zip(("shape", "color", "background", "size", "position"), lists):
            assert negs and len(set(negs)) == len(negs)
            for neg in negs:
                parsed = data.parse_shapes_caption(neg)
                changed = [k for k in attrs if parsed[k] != attrs[k]]
                assert changed == [key], (caption, neg)
                assert parsed["color"] != parsed["background"]
                # same template: same words apart from the changed one(s)
                assert len(neg.split()) - len(caption.split()) in (-2, -1, 0, 1, 2)
    assert data.shapes_hard_negatives("a drawing of a cat") == []


# -----------------------------------------------------------------------------
# COCO captions as they come: an image folder and captions_*.json

COCO_COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}


def _coco(root, split="train2017", names=("red", "green", "blue", "yellow"), extra_captions=None, drop=()):
    """A COCO-style tree: root/<split>/<id>.jpg, one solid colour each, and
    root/annotations/captions_<split>.json whose captions name that colour (ids out of file order,
    so that pairing by id, not by position, is what the tests see). -> the image folder."""
    images, annotations = [], []
    for k, name in enumerate(names):
        image_id = 100 - 7 * k
        file_name = f"{image_id:012d}.jpg"
        if name not in drop:
            _save(str(root / split / file_name), Image.new("RGB", (48 + 8 * k, 40), COCO_COLORS[name]), quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": 48 + 8 * k, "height": 40})
        for text in (extra_captions or {}).get(name, [f"a plain {name} picture"]):
            annotations.append({"image_id": image_id, "id": len(annotations), "caption": text})
    os.makedirs(root / "annotations", exist_ok=True)
    _write(root / "annotations" / f"captions_{split}.json",
           json.dumps({"info": {}, "images": images[::-1], "annotations": annotations}))
    return root / split


def _colour_word(image):
    """The COCO_COLORS name nearest to an image's mean colour."""
    rgb = ((image.mean((1, 2)) + 1) * 127.5).numpy()
    return min(COCO_COLORS, key=lambda n: ((np.array(COCO_COLORS[n]) - rgb) ** 2).sum())


def test_coco_folder_pairs_images_with_their_own_captions(tmp_path):
    folder = _coco(tmp_path / "coco")
    ds = data.build_dataset(str(folder), 16)
    assert isinstance(ds, data.CocoCaptions) and len(ds) == 4
    for i in range(len(ds)):
        image, caption = ds[i]
        assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
        assert caption == f"a plain {_colour_word(image)} picture"
    # the same tree through the other layouts: the root with one split, captions_*.json inside the folder
    assert len(data.build_dataset(str(tmp_path / "coco"), 16)) == 4
    inside = tmp_path / "flat"
    os.makedirs(inside)
    for f in os.listdir(folder):
        os.rename(folder / f, inside / f)
    os.rename(tmp_path / "coco" / "annotations" / "captions_train2017.json", inside / "captions_mine.json")
    ds = data.build_dataset(str(inside), 16)
    assert isinstance(ds, data.CocoCaptions) and sorted(_colour_word(ds[i][0]) for i in range(4)) == \
        sorted(COCO_COLORS)


def test_coco_one_random_caption_per_image_per_epoch(tmp_path):
    many = {"red": ["red one", "red two", "red three"], "green": ["green one", "green two"]}
    folder = _coco(tmp_path / "coco", names=("red", "green"), extra_captions=many)
    ds = data.build_dataset(str(folder), 16, seed=3)
    red = next(i for i in range(2) if _colour_word(ds[i][0]) == "red")
    per_epoch = [ds[(red, e)][1] for e in range(300)]
    assert set(per_epoch) == set(many["red"])                           # only its own captions
    counts = Counter(per_epoch)
    assert all(60 <= c <= 140 for c in counts.values()), counts          # uniform: 100 each expected
    ds.set_epoch(7)
    assert ds[red][1] == per_epoch[7]                                    # set_epoch == the (index, epoch) form
    again = data.build_dataset(str(folder), 16, seed=3)
    assert [again[(red, e)][1] for e in range(300)] == per_epoch         # deterministic from (seed, epoch)
    other = data.build_dataset(str(folder), 16, seed=4)
    assert [other[(red, e)][1] for e in range(300)] != per_epoch


def test_coco_bad_input_one_line_each(tmp_path, caplog):
    folder = _coco(tmp_path / "coco", extra_captions={"green": []}, drop=("blue",))
    _save(str(folder / "stray.png"), Image.new("RGB", (20, 20)))                # in the folder, not listed
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.build_dataset(str(folder), 16)
    assert sorted(_colour_word(ds[i][0]) for i in range(len(ds))) == ["red", "yellow"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in line for line in lines), lines
    assert any("not in" in line and "000000000086.jpg" in line for line in lines)   # blue: missing image
    assert any("without a caption" in line and "000000000093.jpg" in line for line in lines)  # green
    assert any("not listed" in line and "stray.png" in line for line in lines)
    assert dict(ds.skipped) == {"missing image": 1, "no caption": 2}
    # malformed JSON, a caption without text, captions of an image that is not listed: one error line
    captions = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    good = captions.read_text()
    for text, hint in [(good[:-5], "not valid JSON"), ("[]", "no \"images\""),
                       (good.replace('"caption": "a plain red picture"', '"caption": 5'), "annotations[0]"),
                       (good.replace('"image_id": 100', '"image_id": 1'), "does not list")]:
        captions.write_text(text)
        with pytest.raises(ValueError, match="captions_train2017.json") as err:
            data.build_dataset(str(folder), 16)
        assert hint in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_coco_root_with_two_splits_asks_for_one(tmp_path):
    _coco(tmp_path / "coco")
    _coco(tmp_path / "coco", split="val2017")
    with pytest.raises(ValueError, match="pass the image folder of one") as err:
        data.build_dataset(str(tmp_path / "coco"), 16)
    assert "--data" in str(err.value) and "train2017" in str(err.value)
    assert len(data.build_dataset(str(tmp_path / "coco" / "val2017"), 16)) == 4


def test_each_undecodable_file_is_warned_once(tmp_path, caplog):
    """A truncated JPEG passes the up-front check; read many times, it is warned about once."""
    root = _truncated_folder(tmp_path / "trunc", 3)
    ds = data.ImageCaptionFolder(root, 16)
    with caplog.at_level(logging.WARNING, logger="data"):
        captions = [ds[i % len(ds)][1] for i in range(40)]
    assert caplog.text.count("could not decode") == 1 and "1.jpg" in caplog.text
    assert "image 1" not in captions and {"image 0", "image 2"} <= set(captions)


def test_shapes_groups_share_a_caption_and_differ_in_height():
    """ShapesDataset(group=k): indices g*k .. g*k+k-1 share the caption (that of index g of the
    grouped stream), each with its own jitter and height; group=1 is the plain set."""
    plain, grouped = data.ShapesDataset(32, seed=2), data.ShapesDataset(32, seed=2, group=4)
    for g in range(5):
        members = [grouped[4 * g + m] for m in range(4)]
        assert len({caption for _, caption in members}) == 1
        heights = [grouped.render_params(4 * g + m)["cy"] for m in range(4)]
        assert len(set(heights)) == 4
        assert not torch.equal(members[0][0], members[1][0])
    assert [plain[i][1] for i in range(6)] == [data.ShapesDataset(32, seed=2, group=1)[i][1] for i in range(6)]
    assert data.build_dataset("shapes", 32, seed=2, group=4).group == 4
    with pytest.raises(ValueError, match="group >= 1"):
        data.ShapesDataset(32, group=0)
