"""Tests of 03_generator.py: shapes, truncation, mixing, determinism, batch independence,
gradients through the pyramid, parameter counts and the Table 1 switches. CPU, offline, fast."""
import dataclasses

import pytest
import torch
from conftest import CountOps, load

gen = load("03_generator")

D = 128  # text width of the random stand-in for CLIP tokens


@pytest.fixture(scope="module")
def tiny():
    """One tiny G in eval mode, shared by the tests that only run it (never mutated)."""
    torch.manual_seed(0)
    G = gen.Generator(dataclasses.replace(gen.G_PRESETS["tiny"], noise=True), text_dim=D).eval()
    for p in G.parameters():
        p.requires_grad_(False)
    # noise strengths start at 0; make them nonzero so the noise tests can see the noise
    for block in G.synthesis.blocks:
        block.conv.noise.strength.fill_(0.3)
    return G


def text(B, seed=0):
    return gen.random_text(B, D=D, seed=seed)


def run(G, z, tokens, mask, eot, **kw):
    with torch.no_grad():
        return G(z, tokens, mask, eot, **kw)


def record_block_outputs(G):
    """Forward hooks storing every synthesis block's output; returns (outputs list, handles)."""
    outputs, handles = [], []
    for block in G.synthesis.blocks:
        handles.append(block.register_forward_hook(lambda m, i, o: outputs.append(o.clone())))
    return outputs, handles


# ----------------------------------------------------------------------------- text encoder

@pytest.mark.parametrize("depth", [0, 2])
def test_text_encoder_global_local_and_padding(depth):
    T = gen.TextEncoder(D, width=32, depth=depth, heads=2)
    tokens, mask, eot = text(3)
    t_local, local_mask, t_global = T(tokens, mask, eot)
    assert t_local.shape == (3, 77, 32) and local_mask.shape == (3, 77) and t_global.shape == (3, 32)
    assert torch.equal(t_global, t_local[torch.arange(3), eot])          # EOT gathered
    expected = torch.arange(77)[None, :] < eot[:, None]                   # 0..eot-1, EOT dropped
    assert torch.equal(local_mask, expected)
    # padding tokens (after EOT) cannot change anything at the real positions
    noisy = tokens.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), D) * 10
    t_local2, _, t_global2 = T(noisy, mask, eot)
    assert torch.allclose(t_global2, t_global, atol=1e-5)
    assert torch.allclose(t_local2[mask], t_local[mask], atol=1e-5)


# ----------------------------------------------------------------------------- shapes

def test_pyramid_shapes_tiny(tiny):
    tokens, mask, eot = text(2)
    pyramid = run(tiny, torch.randn(2, 128), tokens, mask, eot)
    assert [tuple(x.shape) for x in pyramid] == [(2, 3, r, r) for r in (32, 16, 8, 4)]
    assert all(torch.isfinite(x).all() for x in pyramid)


@pytest.mark.parametrize("preset,text_dim,levels", [("small", 512, 5), ("full", 768, 5)])
def test_pyramid_shapes_large_presets_on_meta(preset, text_dim, levels):
    cfg = gen.G_PRESETS[preset]
    with torch.device("meta"):                                           # shapes only, no memory
        G = gen.Generator(cfg, text_dim=text_dim)
        eot = torch.full((2,), 9)
        mask = torch.arange(77)[None, :] <= eot[:, None]
        pyramid = G(torch.randn(2, cfg.z_dim), torch.randn(2, 77, text_dim), mask, eot)
    assert len(pyramid) == levels
    assert [tuple(x.shape) for x in pyramid] == [(2, 3, 64 >> i, 64 >> i) for i in range(levels)]


def test_full_parameter_count_matches_paper():
    with torch.device("meta"):
        G = gen.Generator(gen.G_PRESETS["full"], text_dim=768)
    n = gen.count_parameters(G)
    assert abs(n - 652.5e6) / 652.5e6 < 0.01, f"{n / 1e6:.1f}M vs 652.5M"


def test_style_index_map_is_named_and_complete(tiny):
    syn = tiny.synthesis
    assert len(syn.w_names) == tiny.num_ws == syn.num_blocks + len(syn.scales)
    used = sorted([b.w_index for b in syn.blocks] + [t.w_index for t in syn.torgbs])
    assert used == list(range(tiny.num_ws))                              # every row read exactly once
    assert syn.w_names[0] == "4px.block0" and syn.w_names[-1] == "32px.torgb"


# ----------------------------------------------------------------------------- truncation

def test_truncation_identity_and_prompt_mean(tiny):
    tokens, mask, eot = text(3)
    _, _, t_global = tiny.text_encoder(tokens, mask, eot)
    w = tiny.mapping(torch.randn(3, 128), t_global)
    assert torch.equal(tiny.truncate(w, t_global, 1.0), w)               # psi = 1: identity
    w_c = tiny.mean_w(t_global, n=64)
    assert torch.allclose(tiny.truncate(w, t_global, 0.0, n=64), w_c)    # psi = 0: w_c
    half = tiny.truncate(w, t_global, 0.5, n=64)
    assert torch.allclose(half, (w + w_c) / 2, atol=1e-6)                # w_c + psi (w - w_c)
    # global target: toward the tracked w_avg
    g0 = tiny.truncate(w, t_global, 0.0, target="global")
    assert torch.allclose(g0, tiny.mapping.w_avg.expand_as(w))
    # psi = 0 through the whole G: every sample of one prompt gives the same image
    tokens1 = tuple(x[:1].expand(4, *x.shape[1:]) for x in (tokens, mask, eot))
    pyr = run(tiny, torch.randn(4, 128), *tokens1, truncation_psi=0.0, noise_mode="const")
    assert torch.allclose(pyr[0][0], pyr[0][3], atol=1e-5)


def test_truncation_toward_a_blend_of_the_prompt_and_global_means(tiny):
    """App. C's target between the two means: g = 0 is "prompt", g = 1 "global", g between blends."""
    tokens, mask, eot = text(3)
    _, _, t_global = tiny.text_encoder(tokens, mask, eot)
    w = tiny.mapping(torch.randn(3, 128), t_global)
    w_c, w_avg = tiny.mean_w(t_global, n=64), tiny.mapping.w_avg.expand_as(w)
    assert not torch.allclose(w_c, w_avg, atol=1e-3)                      # the two targets differ
    assert torch.equal(tiny.truncate(w, t_global, 0.3, 0.0, n=64), tiny.truncate(w, t_global, 0.3, "prompt", n=64))
    assert torch.equal(tiny.truncate(w, t_global, 0.3, 1.0), tiny.truncate(w, t_global, 0.3, "global"))
    w_m = 0.75 * w_c + 0.25 * w_avg
    torch.testing.assert_close(tiny.truncate(w, t_global, 0.0, 0.25, n=64), w_m)
    torch.testing.assert_close(tiny.truncate(w, t_global, 0.4, 0.25, n=64), w_m + 0.4 * (w - w_m))
    with pytest.raises(AssertionError):
        tiny.truncate(w, t_global, 0.5, "mean")


def test_mean_w_is_deterministic_and_per_prompt(tiny):
    tokens, mask, eot = text(3)
    _, _, t_global = tiny.text_encoder(tokens, mask, eot)
    a = tiny.mean_w(t_global, n=32, seed=1)
    assert torch.equal(a, tiny.mean_w(t_global, n=32, seed=1))
    assert torch.allclose(tiny.mean_w(t_global[1:2], n=32, seed=1), a[1:2], atol=1e-6)  # batch-independent
    assert not torch.allclose(a[0], a[1])                                 # depends on the prompt


def test_w_avg_tracked_in_training_mode_only():
    G = gen.Generator(gen.G_PRESETS["tiny"], text_dim=D)
    tokens, mask, eot = text(4)
    _, _, t_global = G.text_encoder(tokens, mask, eot)
    G.eval()
    G.mapping(torch.randn(4, 128), t_global)
    assert torch.equal(G.mapping.w_avg, torch.zeros(G.cfg.w_dim))
    G.train()
    w = G.mapping(torch.randn(4, 128), t_global)
    beta = G.cfg.w_avg_beta
    assert torch.allclose(G.mapping.w_avg, (1 - beta) * w.detach().mean(0), atol=1e-6)
    G.mean_w(t_global, n=8)                                               # never updates w_avg
    assert torch.allclose(G.mapping.w_avg, (1 - beta) * w.detach().mean(0), atol=1e-6)


# ----------------------------------------------------------------------------- mixing

def test_style_mixing(tiny):
    tokens, mask, eot = text(2)
    t_local, local_mask, t_global = tiny.text_encoder(tokens, mask, eot)
    ws_a = tiny.mapping(torch.randn(2, 128), t_global).unsqueeze(1).repeat(1, tiny.num_ws, 1)
    ws_b = tiny.mapping(torch.randn(2, 128), t_global).unsqueeze(1).repeat(1, tiny.num_ws, 1)

    def synth(ws):
        return tiny.synthesis(ws, t_local, local_mask, noise_mode="const")

    img_b = synth(ws_b)[0]
    assert torch.equal(synth(gen.style_mixing(ws_a, ws_b, 0))[0], img_b)              # crossover 0: all b
    assert torch.equal(synth(gen.style_mixing(ws_a, ws_b, tiny.num_ws))[0], synth(ws_a)[0])
    # crossover at the 16 px block: coarse blocks as with ws_a, the image differs from both
    k = tiny.synthesis.w_names.index("16px.block0")
    outs, handles = record_block_outputs(tiny)
    synth(ws_a)
    mixed = synth(gen.style_mixing(ws_a, ws_b, k))[0]
    for h in handles:
        h.remove()
    n = tiny.synthesis.num_blocks
    coarse = [i for i, b in enumerate(tiny.synthesis.blocks) if b.w_index < k]
    assert coarse and all(torch.equal(outs[i], outs[n + i]) for i in coarse)
    assert not torch.allclose(mixed, img_b) and not torch.allclose(mixed, synth(ws_a)[0])


def test_prompt_mixing_changes_only_fine_blocks(tiny):
    tokens_a, mask_a, eot_a = text(2, seed=1)
    tokens_b, mask_b, eot_b = text(2, seed=2)
    t_a, m_a, g_a = tiny.text_encoder(tokens_a, mask_a, eot_a)
    t_b, m_b, _ = tiny.text_encoder(tokens_b, mask_b, eot_b)
    ws = tiny.mapping(torch.randn(2, 128), g_a).unsqueeze(1).repeat(1, tiny.num_ws, 1)
    n = tiny.synthesis.num_blocks
    k = 2                                                                 # blocks 0, 1 coarse (4 and 8 px)
    outs, handles = record_block_outputs(tiny)
    ref = tiny.synthesis(ws, t_a, m_a, noise_mode="const")
    mixed = tiny.synthesis(ws, gen.prompt_mixing(t_a, t_b, k, n), gen.prompt_mixing(m_a, m_b, k, n),
                           noise_mode="const")
    for h in handles:
        h.remove()
    assert tiny.synthesis.blocks[k].cross_attn is not None              # the first fine block reads text
    for i in range(n):
        assert torch.equal(outs[i], outs[n + i]) == (i < k), i            # coarse same, fine changed
    assert torch.equal(ref[-1], mixed[-1])                                # 4 px level: coarse blocks only
    assert not torch.allclose(ref[0], mixed[0])                           # the final image changed


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_image(tiny):
    tokens, mask, eot = text(2)
    z = torch.randn(2, 128)
    a = run(tiny, z, tokens, mask, eot, noise_mode="const")
    b = run(tiny, z, tokens, mask, eot, noise_mode="const")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(5)
    c = run(tiny, z, tokens, mask, eot, noise_mode="random")
    torch.manual_seed(5)
    d = run(tiny, z, tokens, mask, eot, noise_mode="random")
    e = run(tiny, z, tokens, mask, eot, noise_mode="random")
    assert torch.equal(c[0], d[0]) and not torch.allclose(d[0], e[0])     # random noise is seeded
    n1 = run(tiny, z, tokens, mask, eot, noise_mode="none")
    assert not torch.allclose(n1[0], a[0])                                # the noise does something


def test_without_noise_inputs_every_noise_mode_is_the_same_image():
    torch.manual_seed(0)
    G = gen.Generator(dataclasses.replace(gen.G_PRESETS["tiny"], noise=False), text_dim=D).eval()
    assert not any("noise" in name for name in G.state_dict())  # no strengths, no fixed noise images
    z, (tokens, mask, eot) = torch.randn(2, 128), text(2)
    ref = run(G, z, tokens, mask, eot, noise_mode="random")
    for mode in ("random", "const", "none"):
        assert torch.equal(run(G, z, tokens, mask, eot, noise_mode=mode)[0], ref[0]), mode


def test_batch_consistency(tiny):
    """A sample generated in a batch equals the same sample alone: no cross-batch leakage."""
    tokens, mask, eot = text(4)
    z = torch.randn(4, 128)
    batch = run(tiny, z, tokens, mask, eot, noise_mode="const", truncation_psi=0.7)
    for i in (0, 3):
        alone = run(tiny, z[i:i + 1], tokens[i:i + 1], mask[i:i + 1], eot[i:i + 1],
                    noise_mode="const", truncation_psi=0.7)
        for x, y in zip(batch, alone):
            assert torch.allclose(x[i:i + 1], y, atol=1e-5), (x[i:i + 1] - y).abs().max()


def test_no_python_loop_over_the_batch(tiny):
    """The number of tensor ops run does not grow with the batch size."""
    counts = []
    # both at least N^2 = 4 (tiny's largest bank): below it the demodulation energy takes
    # another route (01 AdaptiveConv2d.kernel_energy), a fixed number of other ops
    for B in (4, 9):
        tokens, mask, eot = text(B)
        with CountOps() as c:
            run(tiny, torch.randn(B, 128), tokens, mask, eot, truncation_psi=0.5)
        counts.append(c.n)
    assert counts[0] == counts[1], counts


# ----------------------------------------------------------------------------- gradients

def test_gradients_reach_G_through_every_level():
    G = gen.Generator(gen.G_PRESETS["tiny"], text_dim=D)
    tokens, mask, eot = text(2)
    for level in range(len(G.cfg.scales)):
        G.zero_grad(set_to_none=True)
        pyramid = G(torch.randn(2, 128), tokens, mask, eot)
        pyramid[level].square().mean().backward()
        scale = len(G.cfg.scales) - 1 - level                             # pyramid is finest first
        for name, params in [("const", [G.synthesis.const]), ("T", G.text_encoder.proj.parameters()),
                             ("M", G.mapping.layers[0].parameters()), ("torgb", G.synthesis.torgbs[scale].parameters())]:
            grads = [p.grad for p in params]
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), (level, name)
    # the finest level reaches every parameter except the noise strengths (0 at init,
    # they get gradient too), and the cross-attention reaches T's blocks
    G.zero_grad(set_to_none=True)
    G(torch.randn(2, 128), tokens, mask, eot)[0].square().mean().backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None]
    assert not missing, missing


# ----------------------------------------------------------------------------- switches, demo, errors

@pytest.mark.parametrize("row", ["stylegan2", "+attention", "+adaptive_conv", "+deeper"])
def test_table1_rows_build_and_run(row):
    cfg = gen.table1_config(gen.G_PRESETS["tiny"], row)
    G = gen.Generator(cfg, text_dim=D).eval()
    has_attn = any(b.self_attn is not None for b in G.synthesis.blocks)
    has_cross = any(b.cross_attn is not None for b in G.synthesis.blocks)
    assert has_attn == has_cross == (row != "stylegan2")
    assert (max(b.conv.n_kernels for b in G.synthesis.blocks) > 1) == (row in ("+adaptive_conv", "+deeper"))
    tokens, mask, eot = text(2)
    pyramid = run(G, torch.randn(2, 128), tokens, mask, eot)
    assert [x.shape[-1] for x in pyramid] == [32, 16, 8, 4]


def test_self_attention_reads_the_blocks_own_w_as_a_token(tiny):
    """Eq. 5: g_attn(., w). Every self-attention of G receives its block's style row
    ws[:, w_index] (so style mixing moves it with the conv's style), and changing only the row
    an attention block reads changes the image through that attention; attention_w_token=False
    builds the pixel-only attention."""
    B = 2
    tokens, mask, eot = text(B)
    ws = torch.randn(B, tiny.num_ws, tiny.cfg.w_dim)
    seen = {}
    blocks = [b for b in tiny.synthesis.blocks if b.self_attn is not None]
    assert blocks and all(b.self_attn.w_dim == tiny.cfg.w_dim for b in blocks)
    hooks = [b.self_attn.register_forward_pre_hook(lambda m, args, k=b.w_index: seen.__setitem__(k, args[1]))
             for b in blocks]
    t_local, local_mask, _ = tiny.text_encoder(tokens, mask, eot)
    with torch.no_grad():
        before = tiny.synthesis(ws, t_local, local_mask, noise_mode="const")[0]
    for h in hooks:
        h.remove()
    assert sorted(seen) == [b.w_index for b in blocks]
    assert all(torch.equal(w, ws[:, k]) for k, w in seen.items())
    # the attention alone: same conv style, another w token -> another image
    block = blocks[0]
    f = torch.randn(B, block.conv.out_channels, block.resolution, block.resolution)
    assert not torch.allclose(block.self_attn(f, ws[:, 0]), block.self_attn(f, ws[:, 1]), atol=1e-4)
    assert before.shape == (B, 3, 32, 32)
    plain = gen.Generator(dataclasses.replace(gen.G_PRESETS["tiny"], attention_w_token=False), text_dim=D)
    assert all(b.self_attn.w_token is None for b in plain.synthesis.blocks if b.self_attn is not None)
    assert gen.count_parameters(plain) < gen.count_parameters(tiny)


@pytest.mark.parametrize("over", [dict(self_attention=False), dict(cross_attention=False), dict(n_kernels=(1, 1, 1, 1)),
                                  dict(blocks_per_scale=(2, 3, 2, 2)), dict(attn_resolutions=()), dict(text_depth=0),
                                  dict(attention_w_token=False)],
                         ids=lambda over: next(iter(over)))
def test_single_switches(over):
    """Each Table 1 switch, alone, changes the model: its parameters (names or shapes) and its image
    for the same z and text. Both G start from one seed; a switch that did nothing would build the
    same G, bit for bit, and draw the same image."""
    def build(cfg):
        torch.manual_seed(0)
        G = gen.Generator(cfg, text_dim=D).eval()
        for p in G.parameters():                     # some weights start at 0 (gains, noise strengths): move them
            p.data.add_(0.01 * torch.randn_like(p))
        return G
    base = gen.G_PRESETS["tiny"]
    G0, G1 = build(base), build(dataclasses.replace(base, **over))
    tokens, mask, eot = text(2)
    z = torch.randn(2, 128)
    a, b = run(G0, z, tokens, mask, eot, noise_mode="const"), run(G1, z, tokens, mask, eot, noise_mode="const")
    shapes = lambda G: {k: tuple(v.shape) for k, v in G.state_dict().items()}
    assert shapes(G0) != shapes(G1), over
    assert b[0].shape == (2, 3, 32, 32) and (a[0] - b[0]).abs().max() > 1e-3, over


def test_normalize_2nd_moment_gives_unit_rms_rows():
    x = torch.randn(5, 7) * torch.tensor([[0.1], [1.0], [3.0], [10.0], [1e3]])
    y = gen.normalize_2nd_moment(x)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(5))            # unit RMS per row
    torch.testing.assert_close(y, x / x.norm(dim=1, keepdim=True) * 7 ** 0.5)   # the direction is kept
    assert torch.equal(gen.normalize_2nd_moment(torch.zeros(2, 3)), torch.zeros(2, 3))  # eps: no NaN


def test_mean_w_is_the_mean_of_the_mapping_over_seeded_z(tiny):
    """mean_w(t) = mean over n z (from the seed) of M(z, t), for each prompt alone, w_avg untouched."""
    tokens, mask, eot = text(3)
    with torch.no_grad():
        _, _, t_global = tiny.text_encoder(tokens, mask, eot)
        w_avg = tiny.mapping.w_avg.clone()
        got = tiny.mean_w(t_global, n=16, seed=5)                                  # (3, S)
        z = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
        for b in range(3):
            expected = tiny.mapping(z, t_global[b:b + 1].expand(16, -1), update_w_avg=False).mean(0)
            torch.testing.assert_close(got[b], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(tiny.mapping.w_avg, w_avg)


def test_config_from_plain_dict_and_bad_inputs(tiny):
    cfg = gen.GeneratorConfig(**{**dataclasses.asdict(gen.G_PRESETS["tiny"]), "channels": [64, 64, 64, 32]})
    assert cfg == gen.G_PRESETS["tiny"]                                  # lists from a checkpoint -> tuples
    with pytest.raises(AssertionError):
        gen.GeneratorConfig(resolution=64)                               # tuples of the wrong length
    tokens, mask, eot = text(2)
    with pytest.raises(AssertionError):
        run(tiny, torch.randn(2, 128), tokens[..., :64], mask, eot)      # wrong text width
    with pytest.raises(AssertionError):
        tiny.synthesis(torch.randn(2, tiny.num_ws - 1, 128), tokens, mask)  # wrong number of styles


def test_demo_runs():
    gen.demo()


def test_mapping_mixes_z_and_text_into_every_entry_of_w():
    """w = MLP([normalised z, normalised embedding of t_global]) (checked against that formula);
    every entry of w moves with z and with the text."""
    torch.manual_seed(0)
    M = gen.MappingNetwork(z_dim=8, text_width=6, w_dim=10, num_layers=2, lr_mul=1.0, w_avg_beta=0.9).eval()
    z, t = torch.randn(4, 8), torch.randn(4, 6)
    w = M(z, t)
    assert w.shape == (4, 10)
    x = torch.cat([gen.normalize_2nd_moment(z), gen.normalize_2nd_moment(M.embed(t))], dim=1)
    for layer in M.layers:
        x = layer(x)
    torch.testing.assert_close(w, x)
    assert (M(torch.randn(4, 8), t) - w).abs().min() > 0
    assert (M(z, torch.randn(4, 6)) - w).abs().min() > 0
