"""Tests for 05_losses.py: sign conventions, matching-aware pairs, R1, CLIP loss, LPIPS.

Every discriminator, CLIP and generator here is a toy written for the test (independent of
03/04/00), with only the call signatures of the contract:
    D(pyramid finest first, tokens, mask, eot) -> list of (B,) or (B, h, w) logits
    VD(features list, text_embed (B, E)) -> list of logits
    clip.embed_image(images) -> (B, E), clip.image_features(images) -> list
"""
import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load

L = load("05_losses")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: on a shared, loaded 2-core machine, 2 intra-op threads make each
    small op ~100x slower (threads wait for each other), so this file runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pyramid_of(x, levels):
    """Finest-first pyramid by 2x average pooling."""
    return [F.avg_pool2d(x, 2 ** i) if i else x for i in range(levels)]


def text_of(ids, width=1, length=3):
    """A toy (tokens, mask, eot) triple whose first token's first feature is the caption id."""
    B = len(ids)
    tokens = torch.zeros(B, length, width)
    tokens[:, 0, 0] = torch.as_tensor(ids, dtype=torch.float)
    mask = torch.zeros(B, length, dtype=torch.bool)
    mask[:, :2] = True
    eot = torch.ones(B, dtype=torch.long)
    return tokens, mask, eot


# -----------------------------------------------------------------------------
# The non-saturating loss: formulas and signs

def test_adversarial_losses_equal_the_logistic_formulas():
    real = [torch.randn(5), torch.randn(5, 3, 3)]
    fake = [torch.randn(5), torch.randn(5, 3, 3)]
    # independent formulation: -log sigmoid(real) - log(1 - sigmoid(fake)), mean per prediction, summed
    ref_d = sum(-torch.log(torch.sigmoid(r)).mean() - torch.log(1 - torch.sigmoid(f)).mean()
                for r, f in zip(real, fake))
    ref_g = sum(-torch.log(torch.sigmoid(f)).mean() for f in fake)
    assert torch.allclose(L.d_adversarial_loss(real, fake), ref_d, atol=1e-5)
    assert torch.allclose(L.g_adversarial_loss(fake), ref_g, atol=1e-5)
    # at D = 0 everywhere: log 2 per term
    zeros = [torch.zeros(4), torch.zeros(4, 2, 2)]
    assert math.isclose(float(L.d_adversarial_loss(zeros, zeros)), 4 * math.log(2), rel_tol=1e-6)


def test_gradient_signs_of_every_term():
    """Which way each term pushes each logit: d loss / d logit < 0 means 'call it real'."""
    def grad(fn, n=4):
        x = torch.randn(n, requires_grad=True)
        fn([x]).backward()
        return x.grad

    assert (grad(lambda p: L.d_adversarial_loss(p, [torch.zeros(4)])) < 0).all()  # D: reals up
    assert (grad(lambda p: L.d_adversarial_loss([torch.zeros(4)], p)) > 0).all()  # D: fakes down
    assert (grad(L.g_adversarial_loss) < 0).all()  # G: its images up
    assert (grad(lambda p: L.d_matching_loss(p, [torch.zeros(4)])) > 0).all()  # D: (real, c^) down
    assert (grad(lambda p: L.d_matching_loss([torch.zeros(4)], p)) > 0).all()  # D: (fake, c^) down
    # G side of Eq. 8 (reading (ii)): G too wants (G(c), c^) scored LOW -> positive gradient
    assert (grad(L.g_matching_loss) > 0).all()


def test_matching_loss_masks_rows_without_a_wrong_caption():
    p = torch.randn(4, 2, 2)
    valid = torch.tensor([True, False, True, True])
    ref = F.softplus(p).mean((1, 2))[valid].mean()
    assert torch.allclose(L.g_matching_loss([p], valid), ref)
    assert torch.allclose(L.d_matching_loss([p], [p], valid), 2 * ref)
    assert torch.allclose(L.g_matching_loss([p]), F.softplus(p).mean())  # no mask: plain mean
    none = torch.zeros(4, dtype=torch.bool)
    assert float(L.d_matching_loss([p], [p], none)) == 0.0  # nothing to mismatch: no term


class LinearD(nn.Module):
    """A linear D on a 2-level pyramid: an image logit per level and a patch map on level 0."""

    def __init__(self, channels=3):
        super().__init__()
        self.a0 = nn.Parameter(torch.zeros(channels))
        self.a1 = nn.Parameter(torch.zeros(channels))
        self.c = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, pyramid, tokens=None, mask=None, eot=None):
        x0, x1 = pyramid
        return [x0.mean((2, 3)) @ self.a0 + self.b,  # (B,)
                x1.mean((2, 3)) @ self.a1,  # (B,)
                torch.einsum("bchw,c->bhw", x0, self.c)]  # (B, h, w)


def test_training_a_linear_d_on_two_gaussians_lowers_d_loss_and_raises_g_loss():
    torch.manual_seed(0)
    real = pyramid_of(torch.randn(64, 3, 4, 4) + 1.0, 2)  # reals around +1
    fake = pyramid_of(torch.randn(64, 3, 4, 4) - 1.0, 2)  # fakes around -1
    D = LinearD()
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    d_losses, g_losses = [], []
    for _ in range(30):
        d_loss = L.d_adversarial_loss(D(real), D(fake))
        g_losses.append(L.g_adversarial_loss(D(fake)).item())
        d_losses.append(d_loss.item())
        opt.zero_grad()
        d_loss.backward()
        opt.step()
    assert math.isclose(d_losses[0], 6 * math.log(2), rel_tol=1e-5)  # D = 0: log 2 per term
    assert d_losses[-1] < 0.5 * d_losses[0]  # D learns to separate
    assert g_losses[-1] > 2 * g_losses[0]  # and G's loss on its fakes rises
    assert D.a0.sum() > 0 and D.c.sum() > 0  # the reals (positive) get the high scores


# -----------------------------------------------------------------------------
# Wrong captions

def test_caption_ids():
    assert L.caption_ids(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


def test_mismatched_permutation_distinct_captions_is_a_derangement():
    caps = [f"caption {i}" for i in range(9)]
    for seed in range(10):
        perm = L.mismatched_permutation(caps, generator=torch.Generator().manual_seed(seed))
        assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(9))
        assert (perm != torch.arange(9)).all()


def test_mismatched_permutation_never_pairs_identical_captions():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        B = int(torch.randint(2, 13, (1,), generator=g))
        n_groups = int(torch.randint(2, B + 1, (1,), generator=g))
        ids = torch.randint(0, n_groups, (B,), generator=g)
        if 2 * int(torch.bincount(ids).max()) > B:
            continue  # impossible batches are tested below
        caps = [f"cap {int(i)}" for i in ids]
        perm, valid = L.mismatched_permutation(caps, generator=g, return_valid=True)
        assert sorted(perm.tolist()) == list(range(B))  # a permutation
        assert valid.all()
        assert all(caps[j] != caps[i] for i, j in enumerate(perm.tolist()))
    # the duplicates case from the brief, repeatedly: random, and always valid
    caps = ["cat", "dog", "cat", "bird", "cat", "fish"]
    perms = set()
    for seed in range(30):
        perm = L.mismatched_permutation(caps, generator=torch.Generator().manual_seed(seed))
        assert all(caps[j] != caps[i] for i, j in enumerate(perm.tolist()))
        perms.add(tuple(perm.tolist()))
    assert len(perms) > 5  # not one fixed pairing


def test_mismatched_permutation_when_one_caption_fills_most_of_the_batch():
    caps = ["x", "x", "x", "x", "y", "z"]  # m = 4 > B / 2: at most 2 (B - m) = 4 mismatched rows
    perm, valid = L.mismatched_permutation(caps, return_valid=True)
    assert sorted(perm.tolist()) == list(range(6))
    assert int(valid.sum()) == 4
    assert valid.tolist() == [caps[j] != caps[i] for i, j in enumerate(perm.tolist())]
    with pytest.warns(UserWarning, match="return_valid"):
        L.mismatched_permutation(caps)


def test_mismatched_permutation_all_identical_captions():
    perm, valid = L.mismatched_permutation(["same"] * 5, return_valid=True)
    assert sorted(perm.tolist()) == list(range(5)) and not valid.any()
    with pytest.warns(UserWarning, match="keep their own caption"):
        L.mismatched_permutation(["same"] * 5)
    perm, valid = L.mismatched_permutation(["alone"], return_valid=True)  # B = 1
    assert perm.tolist() == [0] and not valid.any()


# -----------------------------------------------------------------------------
# Which (image, caption) pairs each term sees: read off the gradient sign of each row

class RecorderD:
    """Records (image id, caption id) of every row; its logits are leaves whose grad sign says
    whether the loss treats the row as real (grad < 0) or fake (grad > 0)."""

    def __init__(self):
        self.rows = []  # (image id, caption id, leaf)

    def __call__(self, pyramid, tokens, mask, eot):
        assert len(pyramid) == 2 and mask.dtype == torch.bool and eot.dtype == torch.long
        k = tokens.shape[0] // pyramid[0].shape[0]  # captions per image: row g*B + b goes with image b
        leaf = torch.zeros(tokens.shape[0], requires_grad=True)
        self.rows.append((pyramid[0][:, 0, 0, 0].round().long().repeat(k), tokens[:, 0, 0].round().long(), leaf))
        return [leaf, leaf[:, None, None].expand(-1, 2, 2)]  # an image logit and a patch map

    def pairs(self):
        """[(image id, caption id, sign of d loss / d logit)] over every row of every call."""
        out = []
        for img, cap, leaf in self.rows:
            out += [(int(i), int(c), int(torch.sign(g))) for i, c, g in zip(img, cap, leaf.grad)]
        return out


class RecorderVD(RecorderD):
    """The same for the vision-aided D: features carry the image id, the embedding the caption id."""

    def __call__(self, features, text_embed):
        leaf = torch.zeros(text_embed.shape[0], requires_grad=True)
        self.rows.append((features[0][:, 0, 0, 0].round().long(), text_embed[:, 0].round().long(), leaf))
        return [leaf, 2 * leaf]


class IdCLIP:
    """A 'CLIP' that passes the image through, so recorders can read the image id."""

    def image_features(self, images):
        return [images]

    def embed_image(self, images):
        return F.normalize(images.mean((2, 3)), dim=1)


CAPTIONS = ["cat", "dog", "cat", "bird", "cat", "fish"]  # duplicates on purpose


def batch_with_ids():
    B = len(CAPTIONS)
    ids = L.caption_ids(CAPTIONS)
    real = torch.arange(1, B + 1, dtype=torch.float).view(B, 1, 1, 1).expand(B, 3, 4, 4)  # real i has id i + 1
    fake = -real.clone()  # generated i has id -(i + 1)
    perm, valid = L.mismatched_permutation(CAPTIONS, return_valid=True)
    text = text_of(ids)
    emb = torch.zeros(B, 4)
    emb[:, 0] = ids.float()  # a "caption embedding" that carries the caption id
    return ids, pyramid_of(real, 2), pyramid_of(fake, 2), text, L.permute_text(text, perm), valid, emb, perm


@pytest.mark.parametrize("row", ["off", "d", "g_and_d"])
def test_discriminator_loss_pairs(row):
    """The Table 1 rows: no mismatched pair; (x, c^) only, the (G(c), c^) pair never built;
    both (x, c^) and (G(c), c^). The default config is the "G and D" row (plus match_g)."""
    ids, real, fake, text, wrong, valid, emb, perm = batch_with_ids()
    D, VD = RecorderD(), RecorderVD()
    cfg = dataclasses.replace(L.LossConfig(), table1_matching=row)
    match_real, match_fake = row != "off", row == "g_and_d"
    caps = L.Captions(text, wrong if match_real else None, valid, vision=L.VisionAided(VD, IdCLIP(), emb, emb[perm]))
    loss, logs = L.discriminator_loss(D, real, fake, caps, cfg)
    loss.backward()
    assert len(D.rows) == 1 and len(VD.rows) == 1  # one D call and one VD call for all pairs
    assert all(isinstance(v, float) for v in logs.values())
    assert ("D/match" in logs) == match_real
    for rec in (D, VD):
        pairs = rec.pairs()
        B = len(CAPTIONS)
        # the real term: exactly the real images with their own captions, each once
        treated_real = sorted((i, c) for i, c, s in pairs if s < 0)
        assert treated_real == [(i + 1, int(ids[i])) for i in range(B)]
        assert all(s > 0 for i, c, s in pairs if not (i > 0 and c == int(ids[i - 1])))
        real_rows = [(i, c) for i, c, s in pairs if i > 0]
        fake_rows = [(i, c) for i, c, s in pairs if i < 0]
        assert len(real_rows) == (2 * B if match_real else B)
        assert len(fake_rows) == (2 * B if match_fake else B)
        if match_real:
            # the mismatched term: every real image once, never with its own caption string
            mismatched = [(i, c) for i, c, s in pairs if i > 0 and s > 0]
            assert sorted(i for i, _ in mismatched) == list(range(1, B + 1))
            assert all(c != int(ids[i - 1]) for i, c in mismatched)
        # generated images meet their own caption once (fake term), and a wrong one once only
        # in the "G and D" row: in the "D" row the (G(c), c^) pair is never even built
        own = [c == int(ids[-i - 1]) for i, c in fake_rows]
        assert sorted(own) == [False] * (B if match_fake else 0) + [True] * B


def test_default_matching_is_the_g_and_d_row_plus_the_projects_g_term():
    cfg = L.LossConfig()
    assert cfg.table1_matching == "g_and_d+g"
    assert cfg.match_d and cfg.match_fake and cfg.match_g
    # Table 1's rows, written out: (D's (x, c^) pairs, D's (G(c), c^) pairs, the G-side term)
    rows = {"off": (False, False, False), "d": (True, False, False), "g_and_d": (True, True, False),
            "g_and_d+g": (True, True, True)}                # the last: not a paper row, the project's G term
    for row, want in rows.items():
        row_cfg = dataclasses.replace(cfg, table1_matching=row)
        assert (row_cfg.match_d, row_cfg.match_fake, row_cfg.match_g) == want, row
    assert set(L.MATCHING) == set(rows)
    with pytest.raises(KeyError):
        dataclasses.replace(cfg, table1_matching="g").match_g  # not a row (config.py rejects it as a flag)


@pytest.mark.parametrize("match_g", [True, False])
def test_generator_loss_pairs(match_g):
    ids, real, fake, text, wrong, valid, emb, perm = batch_with_ids()
    D, VD = RecorderD(), RecorderVD()
    cfg = L.LossConfig(table1_matching="g_and_d+g" if match_g else "g_and_d", clip_weight=0.0)
    caps = L.Captions(text, wrong if match_g else None, valid, emb, vision=L.VisionAided(VD, IdCLIP(), emb, emb[perm]))
    loss, logs = L.generator_loss(D, fake, caps, cfg, clip=IdCLIP())
    loss.backward()
    assert ("G/match" in logs) == match_g
    for rec in (D, VD):
        pairs = rec.pairs()
        B = len(CAPTIONS)
        assert all(i < 0 for i, _, _ in pairs)  # G's loss never looks at real images
        own = sorted((i, c) for i, c, s in pairs if s < 0)  # G wants these scored high
        assert own == sorted((-(k + 1), int(ids[k])) for k in range(B))
        wrong_rows = [(i, c) for i, c, s in pairs if s > 0]  # G wants these scored low (reading (ii))
        assert len(wrong_rows) == (B if match_g else 0)
        assert all(c != int(ids[-i - 1]) for i, c in wrong_rows)


# -----------------------------------------------------------------------------
# R1

def random_linear_d(H):
    """A LinearD with random weights, and its input-gradient penalty at any H x H pyramid: per
    image d/dx0 [mean_hw <a0, x0> + mean_hw <c, x0>] = (a0 + c) / (H*H) at every pixel, so
    ||grad_0||^2 = H*H * |a0 + c|^2 / (H*H)^2; level 1 (H/2 x H/2): |a1|^2 / (H/2)^2."""
    torch.manual_seed(0)
    D = LinearD()
    with torch.no_grad():
        for p in (D.a0, D.a1, D.c):
            p.normal_()
    return D, (D.a0 + D.c).square().sum() / (H * H) + D.a1.square().sum() / (H // 2) ** 2


def test_r1_equals_the_analytic_value_for_a_linear_d():
    B, H = 3, 4
    D, expected = random_linear_d(H)
    real = [x.detach().requires_grad_(True) for x in pyramid_of(torch.randn(B, 3, H, H), 2)]
    r1 = L.r1_penalty(real, D(real))
    assert torch.allclose(r1, expected, rtol=1e-5)
    r1.backward()  # double backward reaches D's weights (create_graph=True)
    assert D.a0.grad is not None and D.a0.grad.abs().sum() > 0
    cfg = L.LossConfig(r1_gamma=0.5, r1_interval=4)
    loss, logs = L.lazy_r1_loss(D, real, (None, None, None), cfg)
    assert torch.allclose(loss, 0.5 / 2 * expected * 4, rtol=1e-5)  # gamma/2 * R1 * interval
    assert math.isclose(logs["R1/penalty"], expected.item(), rel_tol=1e-5)
    assert set(logs) == {"R1/penalty", "R1/loss"}


def test_r1_ignores_levels_the_d_does_not_read():
    x = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 2, 2, requires_grad=True)]
    preds = [x[0].sum((1, 2, 3))]  # a single-scale D
    assert torch.allclose(L.r1_penalty(x, preds), torch.tensor(48.0))  # 48 ones per image


# -----------------------------------------------------------------------------
# CLIP contrastive loss (Eq. 9)

def test_clip_loss_is_minimised_by_matching_embeddings():
    torch.manual_seed(0)
    B, E = 8, 16
    text = F.normalize(torch.randn(B, E), dim=1)
    shuffled = text[torch.roll(torch.arange(B), 1)]
    for tau in (0.07, 0.01):
        assert L.clip_contrastive_loss(text, text, tau) < L.clip_contrastive_loss(shuffled, text, tau)
    # equals cross-entropy against the diagonal; caption ids of distinct captions change nothing
    image = F.normalize(text + 0.5 * torch.randn(B, E), dim=1)
    ce = F.cross_entropy(image @ text.t() / 0.07, torch.arange(B))
    assert torch.allclose(L.clip_contrastive_loss(image, text, 0.07), ce, atol=1e-5)
    assert torch.allclose(L.clip_contrastive_loss(image, text, 0.07, torch.arange(B)), ce, atol=1e-5)


def test_clip_loss_counts_every_copy_of_a_duplicated_caption_as_positive():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(4, 8), dim=1)
    text[2] = text[0]  # caption 2 is caption 0 again
    ids = torch.tensor([0, 1, 0, 2])
    with_ids = L.clip_contrastive_loss(text, text, 0.01, ids)
    without = L.clip_contrastive_loss(text, text, 0.01)
    assert with_ids < 1e-3  # matching images are optimal
    assert without > 0.3  # one-hot targets would still charge log 2 on the duplicates


def test_gradient_descent_on_image_embeddings_raises_matching_accuracy():
    torch.manual_seed(0)
    B, E = 16, 32
    text = F.normalize(torch.randn(B, E), dim=1)
    raw = torch.randn(B, E, requires_grad=True)
    opt = torch.optim.SGD([raw], lr=0.5)

    def accuracy():
        return ((F.normalize(raw, dim=1) @ text.t()).argmax(1) == torch.arange(B)).float().mean()

    before = accuracy()
    for _ in range(60):
        loss = L.clip_contrastive_loss(F.normalize(raw, dim=1), text, 0.07)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 0.5 and accuracy() == 1.0


# -----------------------------------------------------------------------------
# Gradients reach the generator through every pyramid level

class ToyG(nn.Module):
    """A shared trunk and one ToRGB per level: every level has its own parameters."""

    def __init__(self, levels=4, res=32):
        super().__init__()
        self.levels, self.res = levels, res
        self.trunk = nn.Linear(8, 4 * res * res)
        self.to_rgb = nn.ModuleList(nn.Conv2d(4, 3, 1) for _ in range(levels))

    def forward(self, z):
        h = self.trunk(z).view(-1, 4, self.res, self.res)
        return [torch.tanh(rgb(F.avg_pool2d(h, 2 ** i) if i else h)) for i, rgb in enumerate(self.to_rgb)]


class ToyTextD(nn.Module):
    """One image logit per level, modulated by the end-of-text token; a patch map at the finest level."""

    def __init__(self, levels=4, width=4):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(3, width) for _ in range(levels))
        self.patch = nn.Conv2d(3, 1, 1)

    def forward(self, pyramid, tokens, mask, eot):
        k = tokens.shape[0] // pyramid[0].shape[0]  # captions per image, as the real D takes them
        pyramid = [x.repeat(k, 1, 1, 1) for x in pyramid]
        t = tokens[torch.arange(tokens.shape[0]), eot]  # (k*B, width)
        preds = [(head(x.mean((2, 3))) * t).sum(1) for head, x in zip(self.heads, pyramid)]
        return preds + [self.patch(pyramid[0])[:, 0]]


class ToyCLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 6, 3, padding=1).requires_grad_(False)

    def image_features(self, images):
        h = self.proj(images)
        return [h, F.avg_pool2d(h, 2)]

    def embed_image(self, images):
        return F.normalize(self.proj(images).mean((2, 3)), dim=1)


class ToyVD(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

    def forward(self, features, text_embed):
        return [(head(f.mean((2, 3))) * text_embed).sum(1) for head, f in zip(self.heads, features)]


def test_gradients_flow_to_every_generator_level_and_only_d_trains_in_the_d_step():
    torch.manual_seed(0)
    caps = ["a", "b", "a", "c"]
    B = len(caps)
    G, D, VD, clip = ToyG(), ToyTextD(), ToyVD(), ToyCLIP()
    text = (torch.randn(B, 3, 4), torch.ones(B, 3, dtype=torch.bool), torch.full((B,), 2))
    perm, valid = L.mismatched_permutation(caps, return_valid=True)
    emb = F.normalize(torch.randn(B, 6), dim=1)
    captions = L.Captions(text, L.permute_text(text, perm), valid, emb, L.caption_ids(caps),
                          L.VisionAided(VD, clip, emb, emb[perm]))
    fake = G(torch.randn(B, 8))
    lpips = L.LPIPS("random")
    loss, logs = L.generator_loss(D, fake, captions, L.LossConfig(), clip=clip, lpips=lpips,
                                  target=torch.rand(B, 3, 32, 32) * 2 - 1)
    loss.backward()
    assert set(logs) == {"G/adv", "G/match", "G/clip", "G/vision", "G/lpips", "G/loss"}
    for name, p in G.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every ToRGB, i.e. every level
    G.zero_grad()
    D.zero_grad()
    real = [torch.rand_like(x) * 2 - 1 for x in fake]
    loss, logs = L.discriminator_loss(D, real, G(torch.randn(B, 8)), captions, L.LossConfig())
    loss.backward()
    assert all(p.grad is None for p in G.parameters())  # fakes are detached in the D step
    assert all(p.grad is not None for p in D.parameters()) and all(p.grad is not None for p in VD.parameters())
    assert set(logs) >= {"D/adv", "D/match", "D/vision", "D/loss"}


def toy_batch(B):
    """A seeded ToyG and ToyTextD, B captions' text, G's pyramid and a random real pyramid."""
    torch.manual_seed(0)
    G, D = ToyG(), ToyTextD()
    text = (torch.randn(B, 3, 4), torch.ones(B, 3, dtype=torch.bool), torch.full((B,), 2))
    fake = G(torch.randn(B, 8))
    return G, D, text, fake, [torch.rand_like(x) * 2 - 1 for x in fake]


def test_pixel_term_adds_weight_times_mse_and_pulls_towards_the_target():
    B = 3
    G, D, text, fake, real = toy_batch(B)
    target = real[0]
    cfg = dataclasses.replace(L.LOSS_PRESETS["upsampler"], table1_matching="g_and_d", lpips_weight=0.0)
    off, logs_off = L.generator_loss(D, fake, L.Captions(text, text), cfg, target=target)
    on, logs_on = L.generator_loss(D, fake, L.Captions(text, text), dataclasses.replace(cfg, pixel_weight=2.5),
                                   target=target)
    mse = ((fake[0] - target) ** 2).mean()                       # written out independently
    torch.testing.assert_close(on - off, 2.5 * mse)
    assert "G/pixel" in logs_on and "G/pixel" not in logs_off
    assert L.LOSS_PRESETS["upsampler"].pixel_weight == 0.0        # the paper's losses by default
    # through generator_loss, the term's gradient on the finest level is 2.5 * 2 (x - target) / n:
    # a step against it moves the image towards the target
    image = fake[0].detach().requires_grad_(True)
    fakes = [image, *(x.detach() for x in fake[1:])]
    on, _ = L.generator_loss(D, fakes, L.Captions(text, text), dataclasses.replace(cfg, pixel_weight=2.5), target=target)
    off, _ = L.generator_loss(D, fakes, L.Captions(text, text), cfg, target=target)
    grad, = torch.autograd.grad(on - off, image)
    torch.testing.assert_close(grad, 2.5 * 2 * (image.detach() - target) / image.numel())
    assert ((image - 10.0 * grad - target).abs().mean() < (image - target).abs().mean()).item()


# -----------------------------------------------------------------------------
# LPIPS

def test_lpips_random_is_a_distance():
    torch.manual_seed(0)
    lpips = L.LPIPS("random")
    assert list(lpips.parameters()) == [] and lpips.state_dict() == {}  # frozen, never checkpointed
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert d_xy.shape == (2,)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    assert (d_xy > 0).all() and torch.allclose(d_xy, d_yx)
    vgg = L.LPIPS("vgg", pretrained=False)  # the paper's trunk, randomly initialised
    assert torch.equal(vgg(x[:1, :, :16, :16], x[:1, :, :16, :16]), torch.zeros(1))


@pytest.mark.filterwarnings("ignore::UserWarning")  # the package calls torchvision's deprecated `pretrained=`
def test_lpips_matches_the_lpips_package():
    lpips_pkg = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ours = L.LPIPS("alex", pretrained=False)
    ref = lpips_pkg.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)  # package lin weights
    taps = L._LPIPS_TRUNKS["alex"][1]
    state = {}
    for name, value in ours.trunk.named_buffers():  # "3.weight" -> "net.slice2.3.weight"
        index = int(name.split(".")[0])
        slice_ = 1 + sum(index > t for t in taps)
        state[f"net.slice{slice_}.{name}"] = value
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("net.")]
    x, y = torch.rand(3, 3, 40, 40) * 2 - 1, torch.rand(3, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours(x, y), ref(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_pretrained_lpips_fails_and_names_the_flag_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: no weights on disk
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # how fast it fails (target < 5 s) is a figure of bench.py
    with pytest.raises(L.MissingWeightsError, match="--lpips random"):
        L.LPIPS("vgg")
    # online but unreachable: one attempt, then the same one-line error (no real network touched)
    for flag in L._OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    with pytest.raises(L.MissingWeightsError, match="--lpips random") as info:
        L.LPIPS("alex")
    assert "\n" not in str(info.value)


# -----------------------------------------------------------------------------
# Config and demo

def test_every_loss_weight_says_where_it_comes_from():
    lines = inspect.getsource(L.LossConfig).splitlines()
    fields = [line for line in lines if ":" in line and "=" in line and line.startswith("    ") and "#" in line]
    assert len(fields) == len(L.LossConfig.__dataclass_fields__)
    for line in fields:
        assert "paper" in line or "project choice" in line, line
    up = L.LOSS_PRESETS["upsampler"]                     # the base model's losses + LPIPS 10, no vision-aided
    base = L.LOSS_PRESETS["base"]
    assert up.vision_weight == 0.0 and up.lpips_weight == 10.0
    assert up.clip_weight == base.clip_weight > 0 and up.clip_temperature == base.clip_temperature
    assert up.match_d and up.match_fake and up.match_g and up.r1_gamma > 0


def test_demo_runs(capsys):
    L.demo()
    assert "ok" in capsys.readouterr().out
