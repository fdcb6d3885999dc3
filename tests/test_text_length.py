"""Text features padded to the batch's longest caption (FrozenCLIP.text_features' default L)
change no output of G, D or U: every consumer masks the padding out. Also the length rules."""
import pytest
import torch

from conftest import load

clip_lib = load("00_clip")
generator = load("03_generator")
discriminator = load("04_discriminator")
upsampler = load("06_upsampler")

CAPTIONS = ["a red circle", "a large blue square on the left of a yellow background", "green"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = clip_lib.TinyCLIPConfig(image_size=16, patch_size=4, vision_width=32, vision_layers=2, text_width=32,
                                  text_layers=2, text_heads=2, embed_dim=32)
    return clip_lib.FrozenCLIP(clip_lib.build_tiny_clip(cfg), spec="test")


def test_default_length_is_the_longest_caption_rounded_up_to_8(clip):
    tokens, mask, eot = clip.text_features(CAPTIONS)
    full, full_mask, full_eot = clip.text_features(CAPTIONS, length=77)
    L = tokens.shape[1]
    assert L % 8 == 0 and int(eot.max()) < L < int(eot.max()) + 9 and full.shape[1] == 77
    assert torch.equal(eot, full_eot) and torch.equal(mask, full_mask[:, :L]) and not full_mask[:, L:].any()
    assert torch.equal(tokens, full[:, :L]) and not full[:, L:].any()   # the same features, less padding
    with pytest.raises(ValueError, match="longest caption"):
        clip.text_features(CAPTIONS, length=int(eot.max()))
    with pytest.raises(ValueError, match="at most 77"):
        clip.text_features(CAPTIONS, length=78)


def test_generator_discriminator_and_upsampler_ignore_the_padding_length(clip):
    short, full = clip.text_features(CAPTIONS), clip.text_features(CAPTIONS, length=77)
    assert short[0].shape[1] < 77
    B, D = len(CAPTIONS), clip.text_width
    G = generator.Generator(generator.G_PRESETS["tiny"], text_dim=D).eval()
    z = torch.randn(B, G.cfg.z_dim)
    with torch.no_grad():
        a, b = G(z, *short, noise_mode="const"), G(z, *full, noise_mode="const")
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))

    Dis = discriminator.Discriminator(discriminator.D_PRESETS["tiny"], text_dim=D).eval()
    pyramid = [torch.rand(B, 3, s, s) * 2 - 1 for s in (32, 16, 8, 4)]
    with torch.no_grad():
        a, b = Dis(pyramid, *short), Dis(pyramid, *full)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))

    U = upsampler.Upsampler(upsampler.U_PRESETS["tiny"], text_dim=D).eval()
    r = U.cfg.in_resolution
    lowres, z = torch.rand(B, 3, r, r) * 2 - 1, torch.randn(B, U.cfg.z_dim)
    with torch.no_grad():
        a = U(lowres, z, *short, noise_aug=0.0, noise_mode="const")
        b = U(lowres, z, *full, noise_aug=0.0, noise_mode="const")
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))
