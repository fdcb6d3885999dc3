"""Tests for 02_attention.py: each op against an independent, obviously correct formulation."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import double_backward, load

att = load("02_attention")
ks = load("01_kernel_selection")


def _linear(layer, x):
    """Apply an EqualLinear by hand: x @ (W / sqrt(fan_in))^T + b (lr_mul = 1)."""
    w = layer.weight / math.sqrt(layer.weight.shape[1])
    return x @ w.T + (layer.bias if layer.bias is not None else 0)


def _naive_softmax(logits, mask):
    """Softmax over the real keys only, written with explicit exp / sum (mask (M,) bool)."""
    e = torch.where(mask, (logits - logits[mask].max()).exp(), torch.zeros_like(logits))
    return e / e.sum() if mask.any() else e


def _reference_self_attention(sa, x, mask):
    """Loop over batch, heads, queries, keys with the pairwise distance written out."""
    B, L, C = x.shape
    nh, hd = sa.heads, C // sa.heads
    q = _linear(sa.to_qk, x)                              # tied: keys are the same vectors
    v = _linear(sa.to_v, x)
    weights = torch.zeros(B, nh, L, L)
    heads_out = torch.zeros(B, L, C)
    for b in range(B):
        for h in range(nh):
            sl = slice(h * hd, (h + 1) * hd)
            for i in range(L):
                dist = torch.stack([((q[b, i, sl] - q[b, j, sl]) ** 2).sum() for j in range(L)])
                a = _naive_softmax(-dist / hd, mask[b])
                weights[b, h, i] = a
                heads_out[b, i, sl] = (a[:, None] * v[b, :, sl]).sum(0)
    return _linear(sa.to_out, heads_out), weights


def _param_count(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- L2 logits

def test_l2_logits_equal_pairwise_distance():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    got = att.l2_logits(q, k, scale=0.25)
    ref = -(q[:, :, :, None, :] - k[:, :, None, :, :]).pow(2).sum(-1) * 0.25
    assert got.shape == (2, 3, 5, 7)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # one entry by a scalar loop
    d = sum((q[1, 2, 4, c] - k[1, 2, 6, c]) ** 2 for c in range(8))
    torch.testing.assert_close(got[1, 2, 4, 6], -d * 0.25, atol=1e-4, rtol=1e-4)


def test_self_attention_matches_loop_reference():
    sa = att.SelfAttention(16, 4)
    with torch.no_grad():
        sa.to_v.bias.normal_()
        sa.to_out.bias.normal_()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out_ref, w_ref = _reference_self_attention(sa, x, mask)
    torch.testing.assert_close(sa.attention_weights(x, mask), w_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sa(x, mask), out_ref, atol=1e-5, rtol=1e-4)
    # no mask = all real
    torch.testing.assert_close(sa(x), _reference_self_attention(sa, x, torch.ones(2, 5, dtype=torch.bool))[0],
                               atol=1e-5, rtol=1e-4)


def test_logit_scale_is_scaled_down():
    sa = att.SelfAttention(64, 2)                         # hd = 32
    assert sa.scale == pytest.approx(1 / 32)
    assert sa.scale < 1 / math.sqrt(32)                   # stronger than the usual 1/sqrt(hd)


# ---------------------------------------------------------------- tokens attend to themselves

def test_token_attends_to_itself():
    sa = att.SelfAttention(32, 4)
    x = torch.randn(3, 9, 32)
    a = sa.attention_weights(x)                           # (B, nh, L, L)
    diag = a.diagonal(dim1=-2, dim2=-1)                   # (B, nh, L)
    assert (diag > 0).all()
    assert (diag >= a.amax(-1) - 1e-6).all()              # distance 0 -> largest logit


def test_identical_tokens_attend_uniformly():
    sa = att.SelfAttention(32, 4)
    x = torch.randn(2, 1, 32).expand(2, 6, 32)
    a = sa.attention_weights(x)
    torch.testing.assert_close(a, torch.full_like(a, 1 / 6))
    diag = a.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(diag, a.amax(-1))          # the diagonal is (tied for) the max


def test_query_key_weights_are_tied():
    sa = att.SelfAttention(32, 4)
    names = {n for n, _ in sa.named_parameters()}
    assert names == {"to_qk.weight", "to_v.weight", "to_v.bias", "to_out.weight", "to_out.bias"}
    x = torch.randn(2, 7, 32)
    a = sa.attention_weights(x)
    logits = a.log()                                      # = logits - logsumexp(row)
    sym = logits - logits.diagonal(dim1=-2, dim2=-1)[..., None]  # s_ij - s_ii = s_ij (s_ii = 0)
    torch.testing.assert_close(sym, sym.transpose(-2, -1), atol=1e-4, rtol=1e-4)  # s_ij = s_ji
    # the weights use exactly that projection for both sides
    qk = att.split_heads(_linear(sa.to_qk, x), 4)
    ref = (-(qk[:, :, :, None] - qk[:, :, None]).pow(2).sum(-1) / 8).softmax(-1)
    torch.testing.assert_close(sa.attention_weights(x), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- masks

def test_self_attention_mask_rows_sum_to_one_and_masked_keys_zero():
    sa = att.SelfAttention(32, 4)
    x = torch.randn(3, 8, 32)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, ::2] = False
    a = sa.attention_weights(x, mask)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 8))
    assert (a.masked_select(~mask[:, None, None, :].expand_as(a)) == 0).all()
    # outputs at real positions do not depend on what sits in the padding
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 32) * 10
    torch.testing.assert_close(sa(x, mask)[mask], sa(x2, mask)[mask], atol=1e-5, rtol=1e-4)


def test_cross_attention_mask_and_widths():
    ca = att.CrossAttention(32, 24, 4)                    # context width differs from image width
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 6, 24)
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    a = ca.attention_weights(x, ctx, mask)
    assert a.shape == (2, 4, 10, 6)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 10))
    assert (a[0, :, :, 3:] == 0).all() and (a[0, :, :, :3] > 0).all()
    out = ca(x, ctx, mask)
    assert out.shape == (2, 10, 32)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0                                   # padded words change nothing
    torch.testing.assert_close(ca(x, ctx2, mask), out)
    # independent dot-product reference for sample 0, head 1
    q = _linear(ca.to_q, x[0])[:, 8:16]
    k = _linear(ca.to_k, ctx[0])[:3, 8:16]
    ref = (q @ k.T / math.sqrt(8)).softmax(-1)
    torch.testing.assert_close(a[0, 1, :, :3], ref, atol=1e-5, rtol=1e-4)


def test_all_masked_rows_give_zero_weights_not_nan():
    sa, ca = att.SelfAttention(16, 2), att.CrossAttention(16, 12, 2)
    x, ctx = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 4, 12)
    smask = torch.tensor([[True] * 5, [False] * 5])
    cmask = torch.tensor([[True, False, False, False], [False] * 4])
    assert (sa.attention_weights(x, smask)[1] == 0).all()
    assert (ca.attention_weights(x, ctx, cmask)[1] == 0).all()
    out = sa(x, smask).sum() + ca(x, ctx, cmask).sum()
    out.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in list(sa.parameters()) + list(ca.parameters()))
    # the image wrapper passes the features through unchanged when no word is real (at init)
    ica = att.ImageCrossAttention(16, 12, 2)
    f = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(ica(f, ctx, cmask)[1], f[1])


def test_bad_masks_are_rejected():
    sa = att.SelfAttention(16, 2)
    x = torch.randn(2, 5, 16)
    with pytest.raises(AssertionError):
        sa(x, torch.ones(2, 5))                           # float, not bool
    with pytest.raises(AssertionError):
        sa(x, torch.ones(2, 4, dtype=torch.bool))         # wrong length
    with pytest.raises(AssertionError):
        att.CrossAttention(16, 12, 2)(x, torch.randn(2, 4, 16))  # wrong context width
    with pytest.raises(AssertionError):
        att.SelfAttention(16, 3)                          # heads must divide dim


# ---------------------------------------------------------------- fused path

@pytest.mark.parametrize("kind", ["self", "cross"])
def test_fused_path_equals_naive(kind):
    x, ctx = torch.randn(3, 7, 32, requires_grad=True), torch.randn(3, 5, 20)
    if kind == "self":
        m, mask = att.SelfAttention(32, 4), torch.ones(3, 7, dtype=torch.bool)
        mask[1, 4:] = False
        mask[2] = False                                   # all masked
        run = lambda: m(x, mask)  # noqa: E731
    else:
        m, mask = att.CrossAttention(32, 20, 4), torch.ones(3, 5, dtype=torch.bool)
        mask[1, 2:] = False
        mask[2] = False
        run = lambda: m(x, ctx, mask)  # noqa: E731
    with torch.no_grad():
        m.to_out.bias.normal_()
    naive = run()
    g_naive = torch.autograd.grad(naive.square().sum(), [x] + list(m.parameters()))
    m.fused = True
    fused = run()
    g_fused = torch.autograd.grad(fused.square().sum(), [x] + list(m.parameters()))
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_fused, g_naive):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- blocks and wrappers

def test_shapes_of_blocks_and_wrappers():
    block = att.TransformerBlock(32, 4, mlp_ratio=2.0)
    x = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    assert block(x, mask).shape == (2, 7, 32) and block(x).shape == (2, 7, 32)
    assert block.mlp[0].weight.shape == (64, 32)
    f = torch.randn(2, 32, 4, 6)                          # non-square map
    isa = att.ImageSelfAttention(32, 4)
    assert isa(f).shape == f.shape
    assert isa.attention_weights(f).shape == (2, 4, 24, 24)
    ica = att.ImageCrossAttention(32, 20, 4)
    assert ica(f, torch.randn(2, 5, 20), torch.ones(2, 5, dtype=torch.bool)).shape == f.shape


def test_image_tokens_roundtrip_and_reduced_residual_gain():
    f = torch.randn(2, 8, 3, 5)
    t = att.image_to_tokens(f)
    assert t.shape == (2, 15, 8)
    torch.testing.assert_close(t[1, 2 * 5 + 4], f[1, :, 2, 4])  # token index = row * W + col
    torch.testing.assert_close(att.tokens_to_image(t, 3, 5), f)
    isa = att.ImageSelfAttention(8, 2)
    assert 0 < isa.residual_gain < 1
    branch = isa.attn(isa.norm(t))                        # the attention branch alone
    expected = att.tokens_to_image(t + isa.residual_gain * branch, 3, 5)
    torch.testing.assert_close(isa(f), expected)


# ---------------------------------------------------------------- w as an additional token (Eq. 5)

def test_image_self_attention_sees_w_as_one_more_token():
    """Eq. 5, g_attn(f, w): with w_dim the pixels attend to A(w) as an extra token. The output
    equals SelfAttention run on [pixels; A(w)] by hand (w token last, its row dropped), and it
    changes with w; without w_dim (D) no w is taken."""
    torch.manual_seed(0)
    B, C, H, W, S = 2, 16, 3, 4, 10
    isa = att.ImageSelfAttention(C, 2, w_dim=S)
    with torch.no_grad():
        isa.w_token.bias.normal_()                        # a non-trivial affine A
    f, w = torch.randn(B, C, H, W), torch.randn(B, S)
    tokens = torch.cat([att.image_to_tokens(f), _linear(isa.w_token, w)[:, None]], dim=1)  # (B, HW + 1, C)
    branch = isa.attn(isa.norm(tokens))[:, : H * W]       # pixel rows only
    expected = att.tokens_to_image(att.image_to_tokens(f) + isa.residual_gain * branch, H, W)
    torch.testing.assert_close(isa(f, w), expected)
    weights = isa.attention_weights(f, w)                 # (B, nh, HW + 1, HW + 1)
    assert weights.shape == (B, 2, H * W + 1, H * W + 1)
    assert (weights[:, :, : H * W, -1] > 0).all()         # every pixel puts weight on the w token
    other = isa(f, torch.randn(B, S))
    assert (other - isa(f, w)).abs().amax() > 1e-3, "the output must depend on w"
    with pytest.raises(AssertionError):
        isa(f)                                            # built with w_dim: w is required
    with pytest.raises(AssertionError):
        att.ImageSelfAttention(C, 2)(f, w)                # D's attention: pixels only


def test_w_token_attention_fused_path_and_double_backward():
    """The w token keeps the fused path equal to the naive one and R1's double backward finite,
    with a gradient reaching w's affine."""
    torch.manual_seed(1)
    isa = att.ImageSelfAttention(16, 2, w_dim=8)
    f = torch.randn(2, 16, 6, 6, requires_grad=True)
    w = torch.randn(2, 8)
    naive = isa(f, w)
    isa.attn.fused = True
    torch.testing.assert_close(isa(f, w), naive, atol=1e-5, rtol=1e-4)
    isa.attn.fused = False
    (grad,) = torch.autograd.grad(naive.square().sum(), f, create_graph=True)
    grad.square().sum().backward()
    assert torch.isfinite(grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in isa.parameters())
    assert isa.w_token.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["self", "image_self", "image_cross", "block"])
def test_double_backward(kind):
    """R1 differentiates the gradient again: grad of grad must exist and be finite."""
    ctx = torch.randn(2, 4, 12)
    cmask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    if kind == "self":
        m = att.SelfAttention(16, 2)
        x = torch.randn(2, 6, 16, requires_grad=True)
        out = m(x, torch.tensor([[True] * 6, [True] * 4 + [False] * 2]))
    elif kind == "image_self":
        m = att.ImageSelfAttention(16, 2)
        x = torch.randn(2, 16, 6, 6, requires_grad=True)  # 36 tokens: cdist would take its NaN mm path
        out = m(x)
    elif kind == "image_cross":
        m = att.ImageCrossAttention(16, 12, 2)
        x = torch.randn(2, 16, 4, 4, requires_grad=True)
        out = m(x, ctx, cmask)
    else:
        m = att.TransformerBlock(16, 2)
        x = torch.randn(2, 6, 16, requires_grad=True)
        out = m(x)
    params = [p for p in m.parameters() if p.requires_grad]
    assert double_backward([out.square()], [x], params) == len(params)
    # the penalty depends on the attention projections (second-order path really exists)
    proj = m.to_qk if kind == "self" else m.attn.to_qk if kind in ("image_self", "block") else m.attn.to_q
    assert proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- equalized LR, weight decay

def test_equalized_lr_unit_normal_init():
    m = nn.ModuleList([att.SelfAttention(256, 4), att.CrossAttention(256, 192, 4)])
    linears = [mod for mod in m.modules() if isinstance(mod, ks.EqualLinear)]
    assert len(linears) == 7
    for lin in linears:
        w = lin.weight
        assert abs(w.mean().item()) < 0.02 and abs(w.std().item() - 1) < 0.02  # stored ~ N(0, 1)
        assert lin.weight_gain == pytest.approx(1 / math.sqrt(w.shape[1]))     # runtime He scale
    # effective weights have the He scale, so the output keeps unit variance
    sa = m[0]
    y = sa.to_v(torch.randn(4096, 256))
    assert abs(y.std().item() - 1) < 0.05


def test_param_groups_cover_every_parameter_once():
    class Toy(nn.Module):                                 # a miniature generator-like module
        def __init__(self):
            super().__init__()
            self.text = nn.Sequential(att.TransformerBlock(16, 2), att.TransformerBlock(16, 2))
            self.conv = nn.Conv2d(8, 8, 3)
            self.affine = ks.EqualLinear(4, 8)            # an EqualLinear outside attention
            self.blocks = nn.ModuleList([att.ImageSelfAttention(8, 2), att.ImageCrossAttention(8, 16, 2)])
            self.shared = self.blocks[0]                  # the same module reachable twice

    model = Toy()
    groups = att.attention_param_groups(model, weight_decay=0.01)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))              # no parameter twice
    assert set(all_ids) == {id(p) for p in model.parameters()}  # none missing
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert set(by_decay) == {0.01, 0.0}
    expected = set()
    for m in model.modules():
        if isinstance(m, att.SelfAttention):
            expected |= {id(m.to_qk.weight), id(m.to_v.weight), id(m.to_out.weight)}
        if isinstance(m, att.CrossAttention):
            expected |= {id(m.to_q.weight), id(m.to_k.weight), id(m.to_v.weight), id(m.to_out.weight)}
    assert by_decay[0.01] == expected
    assert len(expected) == 2 * 3 + 3 + 4                 # two T blocks, one image self, one image cross
    assert id(model.affine.weight) in by_decay[0.0] and id(model.conv.weight) in by_decay[0.0]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.0, 0.99))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # a module without any attention still gets one complete group
    plain = att.attention_param_groups(nn.Linear(3, 3))
    assert len(plain) == 1 and plain[0]["weight_decay"] == 0.0 and len(plain[0]["params"]) == 2


def test_demo_runs():
    load("02_attention").demo()
