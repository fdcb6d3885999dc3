"""00_clip.py: the frozen CLIP wrapper, its cache, loading rules and the tiny CLIP's training.

CPU only and offline (conftest sets HF_HUB_OFFLINE=1). Hand-written towers are checked against
open_clip's own encode_text / encode_image / forward_intermediates.
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import load

clip_lib = load("00_clip")

# A deliberately very small config: these tests check behaviour, not quality.
SMALL = clip_lib.TinyCLIPConfig(image_size=16, vision="vit", patch_size=4, vision_width=32, vision_layers=3,
                                vision_head_width=16, text_width=32, text_layers=2, text_heads=2, embed_dim=32)
# The tiny CLIP's optional ResNet image tower (open_clip's ModifiedResNet; --clip-tower resnet), as small as it gets.
RESNET = clip_lib.TinyCLIPConfig(image_size=32, vision="resnet", resnet_width=8, text_width=32, text_layers=2,
                                 text_heads=2, embed_dim=32)
PROMPTS = ["red", "a large blue square on the left of a yellow background", "a small green triangle"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return clip_lib.FrozenCLIP(clip_lib.build_tiny_clip(SMALL), spec="test")


class ToyPairs(torch.utils.data.Dataset):
    """A few hundred (image, caption) pairs a tiny CLIP can tell apart: colour and left/right."""

    COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}

    def __len__(self):
        return 240

    def __getitem__(self, i):
        color, side = list(self.COLORS)[i % 3], ("left", "right")[(i // 3) % 2]
        image = torch.full((3, 16, 16), -1.0)  # black canvas
        cols = slice(0, 8) if side == "left" else slice(8, 16)
        image[:, 4:12, cols] = torch.tensor(self.COLORS[color])[:, None, None]  # a coloured block
        return image + 0.05 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), \
            f"a {color} block on the {side}"


# ------------------------------------------------------------------------------------- text

def test_demo_runs():
    clip_lib.demo()


def test_text_features_shapes_mask_and_eot(clip):
    tokens, mask, eot = clip.text_features(PROMPTS, length=77)
    assert tokens.shape == (3, 77, SMALL.text_width) and mask.shape == (3, 77) and mask.dtype == torch.bool
    ids, _ = clip_lib.tokenize(clip.tokenizer, PROMPTS, 77)
    for i in range(3):
        n_tokens = len(clip.tokenizer.encode(PROMPTS[i])) + 2  # SOT + words + EOT
        assert eot[i] == n_tokens - 1 == (ids[i] == clip.tokenizer.eot_token_id).nonzero().item()
        assert mask[i, : eot[i] + 1].all() and not mask[i, eot[i] + 1:].any()  # True exactly at 0..eot
        assert (tokens[i, eot[i] + 1:] == 0).all() and (tokens[i, : eot[i] + 1].abs().sum(-1) > 0).all()
    assert eot[0] < eot[2] < eot[1]  # longer prompt, later end-of-text


def test_text_tower_matches_open_clip(clip):
    """Penultimate tokens equal ln_final(block[-2] output) of open_clip's full 77-token pass, and the
    embedding equals encode_text; both survive trimming the padding (causal mask)."""
    m = clip.model
    ids, eot = clip_lib.tokenize(clip.tokenizer, PROMPTS, 77)
    seen = {}
    hook = m.transformer.resblocks[-2].register_forward_hook(lambda mod, i, o: seen.update(x=o))
    reference = m.encode_text(ids, normalize=True)  # (B, E), open_clip's own forward over all 77
    hook.remove()
    tokens, mask, _ = clip.text_features(PROMPTS, length=77)
    expected = m.ln_final(seen["x"])  # (B, 77, D)
    assert torch.allclose(tokens[mask], expected[mask], atol=1e-5)
    assert torch.allclose(clip.embed_text(PROMPTS), reference, atol=1e-5)
    final = m.ln_final(m.transformer(m.token_embedding(ids) + m.positional_embedding, attn_mask=m.attn_mask))
    assert (tokens[mask] - final[mask]).abs().max() > 1e-2  # penultimate != last layer


def test_truncation_warns_once_per_caption(clip):
    long = "a red circle and " * 40  # about 160 tokens
    with pytest.warns(UserWarning, match="truncated"):
        tokens, mask, eot = clip.text_features([long])
    assert eot.item() == 76 and mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        clip_lib.tokenize(clip.tokenizer, [long], 77, clip._warned)
        clip.text_features([long, long])


def test_cache_hits_and_lru():
    torch.manual_seed(0)
    clip = clip_lib.FrozenCLIP(clip_lib.build_tiny_clip(SMALL), spec="test", cache_size=3)
    first = clip.text_features(["a", "b", "a"])  # "a" twice: encoded once
    assert (clip.cache_misses, clip.cache_hits) == (2, 1)
    again = clip.text_features(["a", "b", "a"])  # nothing new is encoded
    assert (clip.cache_misses, clip.cache_hits) == (2, 4)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    clip.embed_text(["a"])  # embeddings share the cache entries
    assert clip.cache_misses == 2
    clip.text_features(["c", "d"])  # cache_size 3: "b" (least recently used) is evicted
    assert list(clip._cache) == ["a", "c", "d"]
    clip.text_features(["e", "f", "g", "h"])  # a batch larger than the cache still works
    assert len(clip._cache) == 3


# ------------------------------------------------------------------------------------- images

def test_image_path_differentiable_and_matches_open_clip(clip):
    images = (torch.rand(2, 3, 24, 24) * 2 - 1).requires_grad_(True)  # resized to 16 inside
    features, embed = clip.image_features_and_embedding(images)
    assert embed.shape == (2, SMALL.embed_dim) and torch.allclose(embed.norm(dim=-1), torch.ones(2))
    assert [f.shape for f in features] == [(2, c, 4, 4) for c in clip.feature_channels]
    (embed.sum() + sum(f.square().mean() for f in features)).backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    x = clip_lib.clip_preprocess(images.detach(), 16, clip.mean, clip.std)
    assert torch.allclose(embed, clip.model.encode_image(x, normalize=True), atol=1e-5)
    ref = clip.model.visual.forward_intermediates(x, indices=clip.feature_layers, intermediates_only=True)
    assert all(torch.allclose(f, r, atol=1e-5) for f, r in zip(features, ref["image_intermediates"]))
    assert torch.equal(clip.embed_image(images), embed) and len(clip.image_features(images)) == 3


def test_written_out_block_matches_open_clip_block_values_and_gradients(clip):
    """clip_block (F.linear + scaled_dot_product_attention) == open_clip's block (nn.MultiheadAttention)."""
    block = clip.model.visual.transformer.resblocks[1]
    x = torch.randn(3, 17, SMALL.vision_width, requires_grad=True)
    ours = clip_lib.clip_block(block, x)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    ref = block(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(g_ours, g_ref, atol=1e-4)
    text_block = clip.model.transformer.resblocks[0]  # causal: the text tower's mask
    x = torch.randn(3, 9, SMALL.text_width)
    ref = text_block(x, attn_mask=clip.model.attn_mask[:9, :9])
    assert torch.allclose(clip_lib.clip_block(text_block, x, causal=True), ref, atol=1e-5)
    assert not torch.allclose(clip_lib.clip_block(text_block, x), ref, atol=1e-3)  # the mask matters


def test_image_tower_in_bfloat16_is_close_and_keeps_the_callers_dtype():
    torch.manual_seed(0)
    clip = clip_lib.FrozenCLIP(clip_lib.build_tiny_clip(SMALL), spec="test bf16")
    images = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    features, embed = clip.image_features_and_embedding(images)
    text_before = clip.text_features(PROMPTS)[0]
    clip.image_tower_to(torch.bfloat16)
    assert clip.model.visual.conv1.weight.dtype == torch.bfloat16
    assert clip.model.token_embedding.weight.dtype == torch.float32  # the text tower is untouched
    features16, embed16 = clip.image_features_and_embedding(images)
    assert embed16.dtype == torch.float32 and all(f.dtype == torch.float32 for f in features16)
    assert (embed16 - embed).abs().max() < 0.05  # bfloat16 keeps ~3 significant digits
    assert all((a - b).abs().max() < 0.05 * b.abs().max() for a, b in zip(features16, features))
    embed16.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    clip._cache.clear()
    assert torch.equal(clip.text_features(PROMPTS)[0], text_before)


def test_resnet_tower_features_differentiable_and_match_open_clip():
    torch.manual_seed(0)
    clip = clip_lib.FrozenCLIP(clip_lib.build_tiny_clip(RESNET), spec="test resnet")
    assert clip.feature_layers == [0, 1, 2, 3] and clip.feature_channels == [32, 64, 128, 256]
    images = (torch.rand(3, 3, 40, 40) * 2 - 1).requires_grad_(True)  # resized to 32 inside
    features, embed = clip.image_features_and_embedding(images)
    assert [f.shape for f in features] == [(3, 32, 8, 8), (3, 64, 4, 4), (3, 128, 2, 2), (3, 256, 1, 1)]
    assert embed.shape == (3, RESNET.embed_dim) and torch.allclose(embed.norm(dim=-1), torch.ones(3))
    (embed.sum() + sum(f.square().mean() for f in features)).backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    x = clip_lib.clip_preprocess(images.detach(), 32, clip.mean, clip.std)
    assert torch.allclose(embed, clip.model.encode_image(x, normalize=True), atol=1e-5)
    # open_clip counts the stem as block 0, so stage i is its block i + 1
    ref = clip.model.visual.forward_intermediates(x, indices=[i + 1 for i in clip.feature_layers],
                                                  intermediates_only=True)
    assert all(torch.allclose(f, r, atol=1e-5) for f, r in zip(features, ref["image_intermediates"]))
    assert clip.state_dict() == {} and list(clip.parameters()) == []  # batch norm folded away, nothing to save


def test_resnet_batchnorm_folding_is_exact():
    """Frozen, each batch norm is folded into its conv; the tower computes the same function."""
    import copy
    torch.manual_seed(0)
    model = clip_lib.build_tiny_clip(RESNET)
    for m in model.visual.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model).eval()
    clip = clip_lib.FrozenCLIP(model, spec="folded")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in clip.modules())
    x = clip_lib.clip_preprocess(torch.rand(4, 3, 32, 32) * 2 - 1, 32, clip.mean, clip.std)
    with torch.no_grad():
        expected = reference.visual.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        features, embed = clip_lib.vision_tower(clip.model, x, clip.feature_layers)
        assert torch.allclose(embed, reference.encode_image(x), atol=1e-5)
    assert all(torch.allclose(f, r, atol=1e-5) for f, r in zip(features, expected["image_intermediates"]))


def test_resnet_tower_needs_a_multiple_of_32_and_known_tower():
    with pytest.raises(ValueError, match="divisible by 32"):
        clip_lib.build_tiny_clip(clip_lib.TinyCLIPConfig(image_size=16, vision="resnet"))
    with pytest.raises(ValueError, match="'resnet' or 'vit'"):
        clip_lib.build_tiny_clip(clip_lib.TinyCLIPConfig(vision="convnext"))


def test_frozen_weights_are_buffers_not_saved(clip):
    assert list(clip.parameters()) == [] and clip.state_dict() == {}  # no optimiser, no checkpoint
    assert all(not b.requires_grad for b in clip.buffers())
    parent = torch.nn.Sequential(clip, torch.nn.Linear(2, 2)).train()
    assert not clip.training and not clip.model.training  # stays in eval mode
    assert set(parent.state_dict()) == {"1.weight", "1.bias"}


# ------------------------------------------------------------------------------------- loading

def test_random_weights_spec_builds():
    clip = clip_lib.load_clip("ViT-S-32/none")  # the smallest ViT open_clip lists (~63M, ~1 s)
    assert clip.spec == "ViT-S-32/none" and clip.image_size == 224 and clip.context_length == 77
    tokens, mask, eot = clip.text_features(["a photo of a cat"])
    assert tokens.shape == (1, 8, clip.text_width)  # padded to 8: SOT, 5 words, EOT
    assert [f.shape[1:] for f in clip.image_features(torch.zeros(1, 3, 32, 32))] == \
        [(c, 7, 7) for c in clip.feature_channels]


def test_missing_pretrained_weights_fail_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # how fast it fails (target < 5 s) is a figure of bench.py
    with pytest.raises(RuntimeError) as err:
        clip_lib.load_clip("ViT-B-32/laion2b_s34b_b79k")
    message = str(err.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in message and "--clip tiny" in message
    assert "--clip ViT-B-32/none" in message and "\n" not in message


@pytest.mark.parametrize("spec, match", [
    ("", "bad CLIP spec"), ("ViT-B-32", "bad CLIP spec"), ("NoSuchNet/none", "unknown open_clip model"),
    ("ViT-B-32/nosuchtag", "no pretrained tag"), (42, "bad CLIP spec")])
def test_bad_spec_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        clip_lib.load_clip(spec)


def test_tiny_file_without_a_tower_name_loads_as_vit(tmp_path):
    """Files written before the ResNet tower have no "vision" key: they hold a ViT."""
    torch.manual_seed(0)
    model = clip_lib.build_tiny_clip(SMALL)
    config = {k: v for k, v in vars(SMALL).items() if k not in ("vision", "resnet_width", "resnet_layers",
                                                                 "resnet_head_width")}
    torch.save({"config": config, "state_dict": model.state_dict()}, tmp_path / "old.pt")
    clip = clip_lib.load_clip(f"tiny:{tmp_path}/old.pt")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(clip.embed_image(x), clip_lib.FrozenCLIP(model, spec="same").embed_image(x), atol=1e-6)


def test_tiny_file_of_another_version_is_a_clear_error_or_loads(tmp_path):
    """Files from the version with the optional ViT conv stem: without the stem they load; with it
    (weights this version cannot build) the error names the command that retrains the CLIP."""
    torch.manual_seed(0)
    model = clip_lib.build_tiny_clip(SMALL)
    for stem in (False, True):
        config = dict(vars(SMALL), conv_stem=stem)
        torch.save({"config": config, "state_dict": model.state_dict()}, tmp_path / f"stem{stem}.pt")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    clip = clip_lib.load_clip(f"tiny:{tmp_path}/stemFalse.pt")
    assert torch.allclose(clip.embed_image(x), clip_lib.FrozenCLIP(model, spec="same").embed_image(x), atol=1e-6)
    with pytest.raises(RuntimeError, match=r"another version.*conv_stem.*--stage clip"):
        clip_lib.load_clip(f"tiny:{tmp_path}/stemTrue.pt")


def test_missing_tiny_file_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="--stage clip"):
        clip_lib.load_clip(f"tiny:{tmp_path}/nothing.pt")


# ------------------------------------------------------------------------------------- tiny CLIP

def test_train_tiny_clip_lowers_loss_and_round_trips(tmp_path, capsys):
    data = ToyPairs()
    held = [data[i] for i in range(0, 240, 8)]  # 30 pairs, the 6 distinct captions
    images = torch.stack([img for img, _ in held])
    captions = [c for _, c in held]
    groups = torch.tensor([sorted(set(captions)).index(c) for c in captions])

    def loss_of(clip):  # the contrastive loss of a frozen CLIP on the held batch
        return clip_lib.contrastive_loss(clip.embed_image(images), clip.embed_text(captions),
                                         clip.model.logit_scale, groups).item()

    torch.manual_seed(0)  # the same initial weights train_tiny_clip starts from (seed=0)
    before = loss_of(clip_lib.FrozenCLIP(clip_lib.build_tiny_clip(SMALL), spec="init"))
    path = str(tmp_path / "clip.pt")
    clip = clip_lib.train_tiny_clip(data, path, steps=150, batch_size=32, lr=1e-3, resolution=16,
                                    log_every=50, seed=0, config=SMALL)
    after = loss_of(clip)
    floor = math.log(5)  # each held caption has 5 copies: the best possible loss is log 5
    assert after - floor < 0.6 * (before - floor), (before, after)
    assert "clip step" in capsys.readouterr().out  # progress is printed
    # the file: plain data, weights_only-loadable, no temp file left; the CLIP returned (whose loss fell
    # above) is the file loaded back, and loading it again gives the same one
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"] == vars(SMALL) and "visual.conv1.weight" in ckpt["state_dict"]
    assert os.listdir(tmp_path) == ["clip.pt"]
    again = clip_lib.load_clip(f"tiny:{path}")
    assert again.spec == f"tiny:{path}" and again.text_width == SMALL.text_width
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.allclose(again.embed_image(x), clip.embed_image(x), atol=1e-6)
    assert torch.allclose(again.text_features(captions)[0], clip.text_features(captions)[0], atol=1e-6)
    # zero-shot evaluation with a caller-given vocabulary and caption function
    acc = clip_lib.zero_shot_attribute_accuracy(
        clip, _Attributed(data), n=30, vocab={"color": list(ToyPairs.COLORS), "side": ["left", "right"]},
        caption_fn=lambda a, template: f"a {a['color']} block on the {a['side']}")
    assert set(acc) == {"color", "side"} and acc["color"] > 0.9 and acc["side"] > 0.9


class _Attributed(torch.utils.data.Dataset):
    """ToyPairs with the `attributes(i)` method zero_shot_attribute_accuracy reads."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]

    def attributes(self, i):
        return {"color": list(ToyPairs.COLORS)[i % 3], "side": ("left", "right")[(i // 3) % 2]}


def test_zero_shot_defaults_use_shapes(clip):
    data = pytest.importorskip("data")
    acc = clip_lib.zero_shot_attribute_accuracy(clip, data.ShapesDataset(16, seed=1), n=6)
    assert set(acc) == {"shape", "color", "background", "size", "position"}
    assert all(0.0 <= a <= 1.0 for a in acc.values())


def test_contrastive_loss_with_hard_negatives_matches_explicit_formula():
    torch.manual_seed(0)
    B, M, E = 5, 3, 8
    img, txt, neg = (F.normalize(torch.randn(n, E), dim=-1) for n in (B, B, M))
    scale = torch.tensor(math.log(10.0))
    groups = torch.tensor([0, 1, 2, 3, 4])
    neg_groups = torch.tensor([7, 2, 8])  # the second negative is image 2's own caption
    loss = clip_lib.contrastive_loss(img, txt, scale, groups, neg, neg_groups)
    # explicit: image i -> text over [texts, negatives], its positives its own text (+ a negative
    # equal to its caption); text -> image over the batch images only
    i2t, t2i = 0.0, 0.0
    for i in range(B):
        cand = torch.cat([txt, neg]) @ img[i] * 10  # (B + M,)
        pos = [i] + [B + m for m in range(M) if neg_groups[m] == groups[i]]
        i2t += -sum(cand.log_softmax(0)[p] for p in pos) / len(pos)
        t2i += -((img @ txt[i] * 10).log_softmax(0)[i])
    assert torch.allclose(loss, (i2t + t2i) / (2 * B), atol=1e-5)
    # without negatives it is the plain symmetric InfoNCE; an extra negative can only raise the loss
    plain = clip_lib.contrastive_loss(img, txt, scale, groups)
    hard = clip_lib.contrastive_loss(img, txt, scale, groups, img[:1], torch.tensor([9]))  # = image 0's embedding
    assert hard > plain


def test_train_tiny_clip_with_hard_negatives(tmp_path, capsys):
    data = pytest.importorskip("data")
    ds = data.ShapesDataset(16, seed=0, length=64)
    clip = clip_lib.train_tiny_clip(ds, str(tmp_path / "c.pt"), steps=3, batch_size=8, resolution=16,
                                    log_every=1, config=SMALL, pool_size=64, negatives=data.shapes_hard_negatives)
    out = capsys.readouterr().out
    assert "hard negatives for 64 pairs" in out and "clip step" in out
    assert clip.embed_text(["a red circle"]).shape == (1, SMALL.embed_dim)


def test_train_tiny_clip_tower_choice(tmp_path):
    """The ViT by default; vision="resnet" (train.py --clip-tower resnet) trains the ResNet tower."""
    data = pytest.importorskip("data")
    for vision in ("vit", "resnet"):
        path = str(tmp_path / f"{vision}.pt")
        kwargs = {} if vision == "vit" else {"vision": "resnet"}
        clip = clip_lib.train_tiny_clip(data.ShapesDataset(32, seed=0, length=16), path, steps=2, batch_size=8,
                                        resolution=32, log_every=0, pool_size=16, **kwargs)
        assert torch.load(path, weights_only=True)["config"]["vision"] == vision
        assert clip.embed_image(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
