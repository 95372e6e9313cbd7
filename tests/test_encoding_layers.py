"""PyTorch-Encoding's Encoding, GramMatrix, Inspiration and UpsampleConv2d: each against its
defining formula in float64, half precision under autocast, and the reference's known bugs
(Inspiration's target outside the state dict, UpsampleConv2d's NameError) not repeated."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tllab.nn import Encoding, GramMatrix, Inspiration, UpsampleConv2d
from tllab.nn.encoding import encoding

DOUBLE = torch.float64


def naive_encoding(x: Tensor, codewords: Tensor, scale: Tensor) -> Tensor:
    """The defining formula on the full (B, N, K, D) residual tensor; ``x`` is (B, D, *)."""
    residuals = x.flatten(2).transpose(1, 2).unsqueeze(2) - codewords  # (B, N, K, D)
    assign = torch.softmax(scale * residuals.pow(2).sum(-1), dim=2)  # (B, N, K)
    return (assign.unsqueeze(-1) * residuals).sum(1)


def seeded(*shape: int, seed: int = 0, dtype: torch.dtype = DOUBLE) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def encoding_layer(d: int, k: int, seed: int = 0) -> Encoding:
    torch.manual_seed(seed)
    return Encoding(d, k).to(DOUBLE)


@pytest.mark.parametrize("shape,k", [
    ((3, 5, 4, 6), 7),  # 4-D
    ((3, 5, 24), 7),  # 3-D
    ((4, 6, 1, 1), 3),  # N = 1
    ((2, 5, 1), 3),  # N = 1, 3-D
    ((3, 5, 4, 3), 1),  # K = 1
])
def test_encoding_matches_naive_formula_and_gradients(shape: tuple[int, ...], k: int) -> None:
    layer = encoding_layer(shape[1], k)
    x = seeded(*shape).requires_grad_()
    grad = seeded(shape[0], k, shape[1], seed=1)
    params = [x, layer.codewords, layer.scale]
    out = layer(x)
    grads = torch.autograd.grad(out, params, grad)
    ref = naive_encoding(x, layer.codewords, layer.scale)
    ref_grads = torch.autograd.grad(ref, params, grad)
    assert out.shape == (shape[0], k, shape[1]) and out.dtype == DOUBLE
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for name, g, r in zip(["input", "codewords", "scale"], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=name)


def test_encoding_3d_and_4d_inputs_agree_and_k1_is_the_mean_residual() -> None:
    x = seeded(2, 5, 3, 4)
    layer = encoding_layer(5, 6)
    torch.testing.assert_close(layer(x), layer(x.flatten(2)), rtol=0, atol=0)
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x), rtol=0, atol=1e-12)
    single = encoding_layer(5, 1)
    expected = 12 * (x.flatten(2).mean(2) - single.codewords).unsqueeze(1)  # A == 1: E = N (mean x - d)
    torch.testing.assert_close(single(x), expected, rtol=0, atol=1e-12)


def test_encoding_gradcheck_with_a_zero_scale() -> None:
    """The hand-written backward, also with a zero scale (where the reference's divides by it)."""
    codewords, scale = seeded(2, 3, seed=1).requires_grad_(), torch.tensor([0.0, -0.7], dtype=DOUBLE).requires_grad_()
    x = seeded(2, 3, 5).requires_grad_()
    assert torch.autograd.gradcheck(encoding, (x, codewords, scale))


def test_encoding_gradients_of_some_inputs_only() -> None:
    layer = encoding_layer(4, 3)
    layer.scale.requires_grad_(False)
    x = seeded(2, 4, 6)  # no gradient to the input (e.g. a frozen backbone)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), [layer.codewords])
    (ref,) = torch.autograd.grad(naive_encoding(x, layer.codewords, layer.scale).square().sum(), [layer.codewords])
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10)


def test_encoding_initialisation_follows_the_reference() -> None:
    torch.manual_seed(0)
    layer = Encoding(64, 32)
    bound = 1 / math.sqrt(64 * 32)
    assert layer.codewords.shape == (32, 64) and layer.scale.shape == (32,)
    assert layer.codewords.abs().max() <= bound and layer.codewords.abs().max() > 0.9 * bound
    assert ((layer.scale >= -1) & (layer.scale <= 0)).all() and layer.scale.min() < -0.5


def test_encoding_rejects_other_inputs() -> None:
    layer = Encoding(4, 2)
    for bad in (torch.randn(2, 3, 5), torch.randn(2, 4), torch.randn(1, 4, 2, 2, 2)):
        with pytest.raises(ValueError, match="Encoding expects"):
            layer(bad)


def test_encoding_bfloat16_autocast_is_finite_and_close_to_float32() -> None:
    torch.manual_seed(0)
    layer = Encoding(32, 8)
    x = torch.randn(2, 32, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = layer(x.bfloat16().float())  # the same (rounded) input in float32
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_encoding_float16_input_whose_squared_norms_overflow_float16() -> None:
    torch.manual_seed(0)
    layer = Encoding(128, 4)
    x = 100 * torch.randn(2, 128, 4)  # ||x||^2 ~ 1.3e6 > 65504
    out = layer(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), layer(x.half().float()), rtol=1e-3, atol=0.5)


@pytest.mark.parametrize("normalize", [True, False])
def test_gram_matrix_equals_einsum(normalize: bool) -> None:
    y = seeded(3, 4, 5, 6)
    expected = torch.einsum("bchw,bdhw->bcd", y, y) / (4 * 5 * 6 if normalize else 1)
    torch.testing.assert_close(GramMatrix(normalize)(y), expected, rtol=0, atol=1e-12)


def test_gram_matrix_is_normalised_by_default_and_computed_in_float32_for_half() -> None:
    y = 40 * torch.randn(1, 3, 64, 64)  # unnormalised sums ~ 6.5e6 overflow float16
    g = GramMatrix()(y.half())
    assert g.dtype == torch.float16 and torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), GramMatrix()(y.half().float()), rtol=1e-3, atol=1e-2)


def test_inspiration_with_identity_weight_and_own_gram_is_g_times_x() -> None:
    x = seeded(1, 4, 3, 5)
    layer = Inspiration(4).to(DOUBLE)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4, dtype=DOUBLE))
    gram = GramMatrix()(x)
    layer.set_target(gram)
    expected = (gram[0] @ x.flatten(2)[0]).view_as(x)  # (I G)^T X = G X, G symmetric
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("targets", [1, 3])
def test_inspiration_follows_the_reference_product_order(targets: int) -> None:
    x = seeded(3, 4, 2, 5)
    weight, gram = seeded(1, 4, 4, seed=1), seeded(targets, 4, 4, seed=2)  # not symmetric: order matters
    layer = Inspiration(4, B=targets).to(DOUBLE)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.set_target(gram)
    grams = gram.expand(3, 4, 4)
    expected = torch.einsum("ki,bij,bkn->bjn", weight[0], grams, x.flatten(2)).view_as(x)  # Y_b = (W G_b)^T X_b
    reference = torch.bmm(torch.bmm(weight.expand_as(gram), gram).transpose(1, 2).expand(3, 4, 4),
                          x.view(3, 4, -1)).view_as(x)  # PyTorch-Encoding's forward
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)


def test_inspiration_target_is_saved_loaded_and_moved() -> None:
    torch.manual_seed(0)
    layer = Inspiration(4, B=2)
    gram = GramMatrix()(torch.randn(2, 4, 6, 6))
    layer.set_target(gram)
    state = layer.state_dict()
    assert set(state) == {"weight", "target"} and not state["target"].requires_grad
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = Inspiration(4, B=2)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fresh.target, gram, rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    fresh.to(DOUBLE)
    assert fresh.target.dtype == DOUBLE and fresh.weight.dtype == DOUBLE
    torch.testing.assert_close(fresh(x.double()), layer(x).double(), rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match='Missing key.*"target"'):  # a saved untargeted layer
        fresh.load_state_dict(Inspiration(4, B=2).state_dict())


def test_inspiration_gradient_reaches_the_network_that_computed_the_target() -> None:
    encoder = nn.Conv2d(3, 4, 1)
    layer = Inspiration(4)
    layer.set_target(GramMatrix()(encoder(torch.randn(1, 3, 5, 5))))
    layer(torch.randn(2, 4, 3, 3)).sum().backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def test_inspiration_rejects_missing_or_mismatched_targets_and_inputs() -> None:
    layer = Inspiration(4, B=2)
    with pytest.raises(RuntimeError, match="set_target"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        layer.set_target(torch.randn(1, 4, 4))
    layer.set_target(torch.randn(2, 4, 4))
    for bad in (torch.randn(3, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.randn(2, 4)):
        with pytest.raises(ValueError, match="expects"):
            layer(bad)
    with pytest.raises(ValueError, match="target must have shape"):
        Inspiration(4, B=2).load_state_dict({"weight": layer.weight, "target": torch.randn(3, 4, 4)})


def test_inspiration_initialisation_follows_the_reference() -> None:
    weight = Inspiration(64).weight
    assert weight.shape == (1, 64, 64) and weight.min() >= 0 and weight.max() <= 0.02


@pytest.mark.parametrize("kernel,stride,padding,dilation,scale", [
    (1, 1, 0, 1, 1), (3, 1, 1, 1, 2), (3, 2, 1, 1, 2), (4, 3, 0, 1, 3), (3, 1, 2, 2, 2), ((3, 5), (2, 1), (0, 2), 1, 4),
])
def test_upsample_conv_output_size_follows_the_implementation(kernel, stride, padding, dilation, scale) -> None:
    layer = UpsampleConv2d(3, 2, kernel, stride, padding, dilation, scale_factor=scale)
    out = layer(torch.randn(2, 3, 11, 9))
    k, s, p, d = (v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, padding, dilation))
    size = [scale * ((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1) for i, n in enumerate((11, 9))]
    assert out.shape == (2, 2, *size)


def test_upsample_conv_with_scale_1_is_conv2d() -> None:
    layer = UpsampleConv2d(4, 6, 3, stride=2, padding=1, groups=2).to(DOUBLE)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).to(DOUBLE)
    conv.load_state_dict(layer.state_dict())
    x = seeded(2, 4, 9, 8)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)


def test_upsample_conv_with_scale_2_is_conv_then_pixel_shuffle() -> None:
    layer = UpsampleConv2d(4, 3, 3, padding=1, dilation=2, scale_factor=2).to(DOUBLE)
    x = seeded(2, 4, 7, 6)
    conv = F.conv2d(x, layer.weight, layer.bias, padding=1, dilation=2)
    assert layer.weight.shape == (12, 4, 3, 3) and conv.shape[1] == 4 * 3
    torch.testing.assert_close(layer(x), F.pixel_shuffle(conv, 2), rtol=0, atol=0)


def test_upsample_conv_constructs_with_the_reference_initialisation() -> None:
    layer = UpsampleConv2d(8, 4, (3, 2), groups=2, scale_factor=2)  # the reference raises NameError here
    bound = 1 / math.sqrt(8 * 3 * 2)
    assert layer.weight.shape == (16, 4, 3, 2) and layer.bias.shape == (16,)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert UpsampleConv2d(8, 4, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="groups=3"):
        UpsampleConv2d(8, 4, 3, groups=3)
