"""
metrics.py - how good are a text-to-image GAN's images: CLIP score, Frechet distances, shapes alignment
(by a pixel judge of the shapes data).

    python sample.py --ckpt runs/tiny --eval                  # these metrics on a trained run -> eval.json
    python sample.py --ckpt runs/small --eval --n 10000       # FID-10k, as the paper's Table 1

One generated image per real caption (image i from seed EVAL_SEED + i), then:
    clip_score       mean cosine of CLIP(image) and CLIP(caption) (paper Sec. 4.1, e.g. 0.307)
    clip_score_real  the same for the real images: the ceiling a run's CLIP allows
    clip_fd          Frechet distance between CLIP image embeddings of generated and real images
                     (a fast, offline stand-in for FID: the same formula on other features)
    fid              Inception FID (Heusel et al. 2017), the number GAN papers report; FID_n for
                     n images (FID-10k: --n 10000). The paper computes it with clean-fid: images
                     resized to 299 px by PIL's bicubic filter, the TF Inception v3 of 2015-12-05.
    align_*          shapes data only: per attribute, how often the pixels (judge_shapes_image)
                     show what the prompt names

Inception FID comes from torchmetrics (FrechetInceptionDistance, with torch-fidelity's port of
the TF Inception, the weights clean-fid and pytorch-fid use). Why torchmetrics rather than
clean-fid: it takes tensors (generated images never go through PNG files), runs on the
training GPU, accepts any nn.Module as its feature extractor (the tests pass a small random
one, so no weights download), and is maintained. The paper's protocol is kept by resizing
to 299 px here, with the same bicubic filter as clean-fid (fid_images).

The reference statistics of the real images (the mean and covariance of their Inception
features) are computed once and cached next to the data (the image folder or the shards'
folder; the run directory for `shapes`, which is procedural): see fid_stats_paths.

Shape legend: B batch, R resolution, E CLIP embedding width, F feature width (2048 for Inception).
"""
import hashlib
import itertools
import os
import socket

import numpy as np
import torch
import torch.nn.functional as F

import data

EVAL_SEED = 12345  # train.py's evaluations use this seed: `sample.py --eval` reproduces its numbers

# -----------------------------------------------------------------------------
# CLIP score and the CLIP-feature Frechet distance


@torch.no_grad()
def embed_images(clip, images, batch=64):
    """CLIP image embeddings in batches (a big CLIP on many images would not fit at once). (B, E)"""
    return torch.cat([clip.embed_image(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def clip_score(clip, images, captions):
    """Mean cosine similarity between CLIP image and caption embeddings (Hessel et al. 2021,
    without their 2.5 * max(., 0) rescaling; the paper reports it this way, e.g. 0.307)."""
    return (embed_images(clip, images) * clip.embed_text(captions)).sum(-1).mean().item()


def frechet_distance(feats_a, feats_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) of two (N, E) feature sets.

    tr((S_a S_b)^{1/2}) = sum of sqrt(eigenvalues of S_a^{1/2} S_b S_a^{1/2}), a symmetric
    PSD matrix, so two symmetric eigendecompositions in float64 replace scipy's sqrtm."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)                   # (E, E)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T   # S_a^{1/2}
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle).item()


# -----------------------------------------------------------------------------
# The judge: read the five attributes of data.py's shapes spec back from pixels, by plain geometry
#
# Used to score generated images against their prompts, so it measures soft quantities that
# survive blur and noise rather than hard pixel counts:
#   background = median of the border pixels (a shape covers at most ~17% of the border);
#   shape colour = median of the pixels farthest from the background (edges are mixtures);
#   alpha = each pixel's position on the line background -> shape colour, in [0, 1];
#   extent along an axis = sum of the alpha profile's max (a soft bounding-box side);
#   kind by fill ratio area / (width * height): square 1, circle pi/4 = 0.785, triangle 0.5,
#        plus the triangle's tell: its mass centroid sits h/6 below its box centre;
#   size by the box height (never clipped: |cy - 0.5| + extent/2 < 0.5), threshold 0.45;
#   position by the alpha centroid x, thresholds 0.4 / 0.6.

# Thresholds are this project's choice, set from measured feature ranges (1000 images each):
# clean, 32 px: fill circle 0.72..0.86, square >= 0.985, triangle 0.51..0.63 with skew >= 0.12,
# |skew| <= 0.03 for the others; blur sigma 1 px + noise std 0.1 at 32 px: circle fill <= 0.83,
# square >= 0.87, triangle skew >= 0.056. Clean images at >= 32 px are judged 100% correctly.
_NOISY = 3.0                 # median border distance (RGB) above which we smooth first
_FAR = 40.0                  # a pixel this far (RGB distance) from the background is "shape"
_SMALL_LARGE = 0.45          # between small (0.27..0.33) and large (0.54..0.66)
_LEFT_CENTER, _CENTER_RIGHT = 0.4, 0.6
_SQUARE_FILL, _TRIANGLE_FILL, _TRIANGLE_SKEW = 0.88, 0.62, 0.05


def _nearest_color(rgb, exclude=None):
    """Name in data.COLORS nearest to an RGB triple (optionally never `exclude`)."""
    names = list(data.COLORS)
    palette = np.array(list(data.COLORS.values()), dtype=np.float64)   # (8, 3)
    d = ((palette - rgb[None]) ** 2).sum(1)         # (8,)
    if exclude is not None:
        d[names.index(exclude)] = np.inf
    return names[int(np.argmin(d))]


def _judge_one(image):
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).numpy().astype(np.float64)
    rgb = np.nan_to_num(rgb, nan=127.5)                                       # (3, H, W)
    _, H, W = rgb.shape
    border = np.concatenate([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], axis=1)  # (3, 2H+2W)
    bg = np.median(border, axis=1)                                            # (3,)
    background = _nearest_color(bg)
    # Noise (a generator's texture) shows up as scatter among the border pixels; if there is
    # any, average 3x3 neighbourhoods first. A box filter keeps area, and keeps the soft box
    # sides below (a straight edge's 1/3 + 2/3 still sums to one pixel).
    # (Not below 24 px: there a small shape is ~5 px wide and averaging would erase it.)
    noisy = np.median(np.sqrt(((border - bg[:, None]) ** 2).sum(0))) > _NOISY
    if noisy and min(H, W) >= 24:
        padded = np.pad(rgb, ((0, 0), (1, 1), (1, 1)), mode="edge")          # (3, H+2, W+2)
        rgb = sum(padded[:, i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0
    diff = rgb - bg[:, None, None]                                            # (3, H, W)
    dist = np.sqrt((diff ** 2).sum(0))                                        # (H, W)
    far = dist > _FAR
    details = dict(fill=0.0, height=0.0, cx=0.5, cy=0.5, skew=0.0, found=bool(far.any()))
    if not far.any():  # nothing stands out: a blank image. Best guess, never a crash.
        guess = dict(shape="circle", color=_nearest_color(bg, exclude=background),
                     background=background, size="small", position="center")
        return guess, details
    core = dist >= 0.8 * np.percentile(dist[far], 90)                         # solid interior
    fg = np.median(rgb[:, core], axis=1)                                      # (3,)
    color = _nearest_color(fg, exclude=background)  # the spec guarantees they differ
    v = fg - bg
    alpha = (diff * v[:, None, None]).sum(0) / max(float(v @ v), 1e-6)       # (H, W) projection
    # a ramp 0.25..0.75 zeroes faint noise; it is symmetric about 0.5, so edge pixels
    # (anti-aliasing, blur) keep the shape's area on average
    alpha = np.clip((alpha - 0.25) / 0.5, 0.0, 1.0)
    area = max(alpha.sum(), 1e-6)
    rows, cols = alpha.max(1), alpha.max(0)                                   # (H,), (W,)
    height, width = max(rows.sum(), 1e-6), max(cols.sum(), 1e-6)              # soft box sides
    ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5
    cx = (alpha.sum(0) * xs).sum() / area / W                                 # centroid x / W
    y_mass = (alpha.sum(1) * ys).sum() / area
    y_box = (rows * ys).sum() / height
    fill = area / (width * height)
    skew = (y_mass - y_box) / height      # triangle: 2/3 - 1/2 = 1/6; circle, square: 0
    if skew > _TRIANGLE_SKEW or fill < _TRIANGLE_FILL:
        shape = "triangle"
    elif fill > _SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    size = "small" if height / H < _SMALL_LARGE else "large"
    position = "left" if cx < _LEFT_CENTER else ("right" if cx > _CENTER_RIGHT else "center")
    details.update(fill=float(fill), height=float(height / H), cx=float(cx), cy=float(y_box / H),
                   skew=float(skew))                 # cy: the soft box's centre, as the spec places it
    return dict(shape=shape, color=color, background=background, size=size,
                position=position), details


def judge_shapes_image(image, details=False):
    """Attributes of a shapes image by pixel geometry (no learning).

    image: (3, H, W) or (B, 3, H, W) in [-1, 1] -> attrs dict, or a list of B dicts.
    details=True also returns the measurements (fill, height, cx, cy, skew, found) per image.
    Never raises on odd content (noise, blank, NaN): it returns its best guess.
    """
    image = torch.as_tensor(image)
    if image.dim() == 4:
        out = [judge_shapes_image(x, details) for x in image]
        return out
    assert image.dim() == 3 and image.shape[0] == 3, f"expected (3, H, W), got {tuple(image.shape)}"
    attrs, info = _judge_one(image)
    return (attrs, info) if details else attrs


# -----------------------------------------------------------------------------
# Shapes alignment: do the pixels show what the prompt says?

SHAPES_ATTRIBUTES = ("shape", "color", "background", "size", "position")


def shapes_alignment(images, prompts):
    """Shapes toy data: judge generated images by pixel geometry (judge_shapes_image)
    against the attributes their prompts name -> accuracy per attribute, and the mean.
    A prompt that does not name an attribute does not count for it."""
    truth = [data.parse_shapes_caption(p) for p in prompts]
    judged = judge_shapes_image(images.float().cpu())
    acc = {}
    for a in SHAPES_ATTRIBUTES:
        hits = [j[a] == t[a] for j, t in zip(judged, truth) if t[a] is not None]
        if hits:
            acc[a] = sum(hits) / len(hits)
    acc["mean"] = sum(acc.values()) / max(len(acc), 1)
    return acc


SPREAD_KEYS = ("cx", "cy", "height")  # what the spec jitters: centre x, centre y, extent


def seed_spread(images, captions, reference=32, seed=0):
    """Do different z of one caption draw it differently, as the data does?

    images: (P, n_z, 3, R, R), n_z samples of each of P shapes captions. For each caption, keep
    the samples whose shape the judge reads as the caption's (a G that scatters wrong shapes
    is not diverse), measure the centre x, centre y and extent of each, and divide their
    standard deviation over z by that of `reference` real images of the same attributes
    (data.jittered_shapes: the spec's jitter). -> {"spread_x", "spread_y", "spread_size":
    the median ratio over captions with >= 3 right samples (1.0: as varied as the data; 0: one
    picture per caption), "spread_captions": how many captions counted}.
    """
    P, n_z = images.shape[:2]
    assert len(captions) == P, (len(captions), P)
    ratios = {k: [] for k in SPREAD_KEYS}
    for p, caption in enumerate(captions):
        truth = data.parse_shapes_caption(caption)
        judged = judge_shapes_image(images[p].float().cpu(), details=True)
        right = [info for attrs, info in judged if attrs["shape"] == truth["shape"]]
        if len(right) < 3:
            continue
        reals = data.jittered_shapes(truth, reference, images.shape[-1], seed=seed + p)
        real = [info for _, info in judge_shapes_image(reals, details=True)]
        for k in SPREAD_KEYS:
            fake_std = torch.tensor([i[k] for i in right]).std().item()
            real_std = torch.tensor([i[k] for i in real]).std().item()
            ratios[k].append(fake_std / max(real_std, 1e-6))
    out = {f"spread_{name}": (torch.tensor(ratios[k]).median().item() if ratios[k] else 0.0)
           for k, name in zip(SPREAD_KEYS, ("x", "y", "size"))}
    out["spread_captions"] = len(ratios["cx"])
    return out


# -----------------------------------------------------------------------------
# Inception FID (torchmetrics), its weights and its cached reference statistics

# torch-fidelity's Inception v3 (TF 2015-12-05 weights), kept here so that a missing file is
# found without importing torchmetrics (seconds); tests check it equals torch-fidelity's own.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
FID_SIZE = 299             # Inception v3's input side
DOWNLOAD_TIMEOUT_S = 3.0   # per socket operation: offline, the attempt ends in about a second


class FIDUnavailable(RuntimeError):
    """Inception FID cannot run here (no weights and no network, or no torchmetrics): one line
    that names the flag which turns it off."""


def inception_weights(flag):
    """Path of the Inception weights in torch.hub's cache ($TORCH_HOME/hub/checkpoints), downloaded
    once (91 MB) if missing. Offline: FIDUnavailable, in about a second, naming `flag`."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub opens the URL without a timeout
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, path, progress=True)  # via a temp file: never half a file
    except OSError as err:  # urllib's URLError and socket timeouts are OSErrors
        reason = getattr(err, "reason", None) or err
        raise FIDUnavailable(f"Inception FID needs the Inception v3 weights, which could not be downloaded "
                             f"({reason}): put {INCEPTION_URL} at {path}, or pass {flag}") from None
    finally:
        socket.setdefaulttimeout(old)
    return path


def fid_images(images):
    """Generated or real images (B, 3, R, R) in [-1, 1] -> (B, 3, 299, 299) uint8, as clean-fid
    prepares them: the 8-bit image a PNG would hold, resized in float by PIL's bicubic filter
    (torch's antialiased bicubic is that filter, a = -0.5), rounded to 8 bits for torchmetrics,
    whose own resize is then the identity."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round()                        # (B, 3, R, R) in 0..255
    x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8)                                 # (B, 3, 299, 299)


def data_fingerprint(dataset):
    """A short hash of what a data set holds (its files and captions, its shards, or the
    shapes set's seed), so cached statistics of other data are never reused."""
    what = [type(dataset).__name__, getattr(dataset, "resolution", None)]
    for attr in ("items", "urls", "seed"):
        if hasattr(dataset, attr):
            what.append(getattr(dataset, attr))
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        what.append(len(dataset))
    return hashlib.sha1(repr(what).encode()).hexdigest()[:16]


def fid_stats_paths(spec, run_dir, name, resolution, n, seed):
    """Where reference statistics are cached: next to the data (the image folder, or the folder
    of the shards), else in the run directory (always for the procedural `shapes`). -> a list of
    candidate files, first choice first; the file name says what they are statistics of."""
    file = f"fid_stats_{name}_{resolution}px_n{n}_seed{seed}.pt"
    folders = [] if spec == "shapes" else [spec if os.path.isdir(spec) else os.path.dirname(spec) or "."]
    return [os.path.join(f, file) for f in folders + [run_dir]]


class InceptionFID:
    """FID of generated images against the reference statistics of real ones.

    feature: None -> the Inception v3 (weights from inception_weights), or any nn.Module taking
    (B, 3, 299, 299) uint8 images to (B, F) features (torchmetrics' own way to swap the network;
    the tests pass a small random one). The real side is set once (reference) and kept; every
    score() is a fresh generated side against it."""

    def __init__(self, device="cpu", feature=None, flag="--no-fid", batch=64):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError:
            raise FIDUnavailable(f"Inception FID needs torchmetrics and torch-fidelity "
                                 f"(pip install torchmetrics torch-fidelity), or pass {flag}") from None
        if feature is None:
            metric = FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                              feature_extractor_weights_path=inception_weights(flag))
            self.name = "inception"
        else:
            metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)
            self.name = type(feature).__name__.lower()
        self.metric, self.device, self.batch = metric.to(device), device, batch
        self.n_real = 0

    @torch.no_grad()
    def _add(self, images, real):
        for i in range(0, len(images), self.batch):
            self.metric.update(fid_images(images[i:i + self.batch].to(self.device)), real=real)

    def reference(self, dataset, n, seed=EVAL_SEED, paths=()):
        """Set the real side: the Inception features of eval_pairs(dataset, n, seed), read from the
        first of `paths` that holds them for this data and network, else computed and saved to the
        first that can be written. -> the file used (None if none could be written)."""
        key = {"features": self.name, "n": n, "seed": seed, "data": data_fingerprint(dataset)}
        for path in paths:
            if os.path.isfile(path):
                stats = torch.load(path, map_location="cpu", weights_only=True)
                if stats.get("key") == key:
                    self._set_real(stats)
                    return path
        reals, _ = eval_pairs(dataset, n, seed)
        self.metric.reset()
        self._add(reals, real=True)
        m = self.metric
        stats = {"key": key, "sum": m.real_features_sum.cpu(), "cov_sum": m.real_features_cov_sum.cpu(),
                 "n": m.real_features_num_samples.cpu()}
        self.n_real = int(stats["n"])
        for path in paths:
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                torch.save(stats, path + ".tmp")
                os.replace(path + ".tmp", path)   # whole or not at all
                return path
            except OSError:  # a read-only data folder: try the next place
                continue
        return None

    def _set_real(self, stats):
        m = self.metric
        m.real_features_sum = stats["sum"].to(self.device, torch.float64)          # (F,)
        m.real_features_cov_sum = stats["cov_sum"].to(self.device, torch.float64)  # (F, F)
        m.real_features_num_samples = stats["n"].to(self.device)
        self.n_real = int(stats["n"])

    def score(self, fakes):
        """FID of generated images (B, 3, R, R) in [-1, 1] against the reference."""
        if self.n_real < 2:
            raise RuntimeError("InceptionFID.reference() must be called first (with n >= 2)")
        self.metric.reset()       # clears the generated side only (reset_real_features=False)
        self._add(fakes, real=False)
        return float(self.metric.compute())


def prepare_fid(dataset, spec, run_dir, n, seed=EVAL_SEED, device="cpu", flag="--no-fid", feature=None):
    """An InceptionFID whose reference is the data set's n eval images (cached, see
    fid_stats_paths): what sample.py --eval and train.py's periodic eval call once."""
    fid = InceptionFID(device, feature, flag)
    resolution = getattr(dataset, "resolution", "any")
    fid.reference(dataset, n, seed, fid_stats_paths(spec, run_dir, fid.name, resolution, n, seed))
    return fid


# -----------------------------------------------------------------------------
# Evaluation: n (real, caption) pairs, and every metric on one set of generated images


def eval_pairs(dataset, n, seed=EVAL_SEED):
    """n (real image, caption) pairs: a seeded random subset, or a stream's first n.
    -> images (n, 3, R, R), captions list[str]."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        pairs = list(itertools.islice(iter(dataset), n))
    else:
        g = torch.Generator().manual_seed(seed)
        pairs = [dataset[i] for i in torch.randperm(len(dataset), generator=g)[:n].tolist()]
    reals, captions = zip(*pairs)
    return torch.stack(reals), list(captions)


@torch.no_grad()
def eval_metrics(clip, fakes, reals, captions, shapes=False, fid=None):
    """CLIP score of generated and of real images, CLIP-feature Frechet distance between them,
    with `fid` (an InceptionFID with its reference set) the Inception FID, and on the shapes
    data the alignment of the generated images with their captions."""
    e_fake, e_real = embed_images(clip, fakes), embed_images(clip, reals.to(fakes.device))  # (n, E)
    e_text = clip.embed_text(captions)                                                     # (n, E)
    out = {"clip_score": (e_fake * e_text).sum(-1).mean().item(),
           "clip_score_real": (e_real * e_text).sum(-1).mean().item(),
           "clip_fd": frechet_distance(e_fake, e_real)}
    if fid is not None:
        out["fid"] = fid.score(fakes)
    if shapes:
        out.update({f"align_{k}": v for k, v in shapes_alignment(fakes, captions).items()})
    return out
