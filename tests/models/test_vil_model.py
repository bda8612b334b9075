"""Vision-LSTM as a timm model: registration, parameter counts, architecture details, the timm contract.

Forward tests use small models (D 32, 2-4 sub-blocks, 32-64 px); the published sizes are built on the meta device.
"""

import math

import pytest
import timm
import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import get_notrace_functions
from timm.optim import create_optimizer_v2

import vil
from vil.layers import BlockDiagonalLinear, MultiHeadLayerNorm, ViLLayer

# name -> (version, D, sub-blocks, token grid side at 224 px), from the paper / the authors' hubconf
PUBLISHED = {
    "vil_tiny": (2, 192, 24, 14),
    "vil_small": (2, 384, 24, 14),
    "vil_base": (2, 768, 24, 14),
    "vil_large": (2, 1024, 48, 14),
    "vil1_tiny": (1, 192, 24, 14),
    "vil1_tinyplus": (1, 192, 29, 14),
    "vil1_tinyplus_stride8": (1, 192, 29, 27),
    "vil1_small": (1, 384, 24, 14),
    "vil1_smallplus": (1, 384, 26, 14),
    "vil1_smallplus_stride8": (1, 384, 26, 27),
    "vil1_base": (1, 768, 24, 14),
    "vil1_base_stride8": (1, 768, 24, 27),
}


def small(name: str = "vil_tiny", **kwargs) -> vil.VisionLSTM:
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_classes": 10}
    args.update(kwargs)
    torch.manual_seed(0)
    return timm.create_model(name, **args)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_param_count(version: int, dim: int, depth: int, grid: int, classes: int = 1000) -> int:
    """Closed form from the spec's parameter list (v1: no biases in projections and norms, conv1d kernel 4)."""
    inner, bias = 2 * dim, version == 2
    per_block = (
        dim * (2 if bias else 1)  # block norm
        + dim * 2 * inner
        + (2 * inner if bias else 0)  # proj_up
        + 3 * (inner // 4 * 16 + (inner if bias else 0))  # q, k, v block-diagonal
        + inner * (9 if version == 2 else 4)
        + inner  # depthwise conv
        + 2 * (3 * inner * 4 + 4)  # input and forget gates
        + inner * (2 if bias else 1)  # mLSTM output norm
        + inner  # learnable skip
        + inner * dim
        + (dim if bias else 0)  # proj_down
    )
    pooled = 2 * dim if version == 2 else dim
    stem = 3 * 16 * 16 * dim + dim + grid * grid * dim
    head = dim * (2 if bias else 1) + 2 * pooled + pooled * classes + classes
    return depth * per_block + stem + head


def test_registered_names_and_cfgs():
    names = set(PUBLISHED)
    assert names <= set(timm.list_models("vil*"))
    required = (
        "input_size",
        "crop_pct",
        "interpolation",
        "mean",
        "std",
        "num_classes",
        "first_conv",
        "classifier",
        "license",
        "fixed_input_size",
        "origin_url",
        "paper_ids",
    )
    for name in names:
        model = timm.create_model(name, device="meta")
        cfg = model.pretrained_cfg
        for key in required:
            assert key in cfg, (name, key)
        assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
        assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
        assert model.get_submodule(cfg["first_conv"]).weight.shape[1] == 3
        if name != "vil_large":
            assert cfg["url"].startswith("https://ml.jku.at/research/vision_lstm/download/") and cfg["url"].endswith(
                ".th"
            )
    files = {
        timm.create_model(f"{n}.{t}", device="meta").pretrained_cfg["url"].rsplit("/", 1)[1]
        for n, t in [
            ("vil_tiny", "in1k_e800"),
            ("vil_tiny", "in1k_e400"),
            ("vil_small", "in1k_e400"),
            ("vil_base", "in1k_e400"),
        ]
    }
    assert files == {
        "vil2_tiny16_e800_in1k.th",
        "vil2_tiny16_e400_in1k.th",
        "vil2_small16_e400_in1k.th",
        "vil2_base16_e400_in1k.th",
    }


def test_published_parameter_counts():
    assert count(timm.create_model("vil_tiny", device="meta")) == 6_391_528
    assert count(timm.create_model("vil_base", device="meta")) == 89_263_528
    assert count(timm.create_model("vil1_tiny", device="meta")) == 6_088_360
    assert round(count(timm.create_model("vil_small", device="meta")) / 1e6, 2) == 23.40
    assert round(count(timm.create_model("vil_large", device="meta")) / 1e6) == 310


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_and_architecture(name):
    version, dim, depth, grid = PUBLISHED[name]
    model = timm.create_model(name, device="meta")
    assert count(model) == expected_param_count(version, dim, depth, grid)
    assert len(model.blocks) == depth and model.embed_dim == dim
    assert model.pos_embed.shape == (1, grid, grid, dim)
    assert model.blocks[0].layer.mlstm.num_heads == 4
    assert [b.layer.reverse for b in model.blocks] == [i % 2 == 1 for i in range(depth)]
    assert model.patch_embed.proj.kernel_size == (16, 16)
    assert model.global_pool == ("bilateral_flatten" if version == 2 else "bilateral_avg")
    conv = model.blocks[0].layer.conv.weight
    assert conv.shape == ((2 * dim, 1, 3, 3) if version == 2 else (2 * dim, 1, 4))
    assert model.norm.eps == 1e-5 and model.blocks[0].norm.eps == 1e-5 and model.fc_norm.eps == 1e-6
    assert model.blocks[0].layer.mlstm.norm.eps == 1e-5


def test_unknown_kwarg_is_a_type_error():
    with pytest.raises(TypeError):
        vil.VisionLSTM(embed_dim=32, depth=2, not_an_arg=1)


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="even embed_dim"):
        vil.VisionLSTM(embed_dim=33, depth=2, device="meta")
    with pytest.raises(ValueError, match="global_pool"):
        vil.VisionLSTM(embed_dim=32, depth=2, global_pool="max", device="meta")


def test_mnist_recipe_model():
    model = timm.create_model(
        "vil_tiny", img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, pretrained=False
    )
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert model.pos_embed.shape == (1, 7, 7, 64)


@pytest.mark.parametrize("name,pooled", [("vil_tiny", 64), ("vil1_tiny", 32)])
def test_forward_shapes_and_widths(name, pooled):
    model = small(name).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 32) and feats.shape[-1] == model.num_features == 32
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, pooled) == (2, model.head_hidden_size)
    assert model(x).shape == (2, 10)
    model.reset_classifier(0)
    out = model(x)
    assert out.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(out, pre)


def test_bilateral_pooling():
    model = small("vil_tiny").eval()
    tokens = torch.randn(2, 16, 32)
    expected = F.layer_norm(
        torch.cat([tokens[:, 0], tokens[:, -1]], -1), (64,), model.fc_norm.weight, model.fc_norm.bias, 1e-6
    )
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), expected)
    model1 = small("vil1_tiny").eval()
    expected = F.layer_norm((tokens[:, 0] + tokens[:, -1]) / 2, (32,), model1.fc_norm.weight, model1.fc_norm.bias, 1e-6)
    torch.testing.assert_close(model1.forward_head(tokens, pre_logits=True), expected)


def test_block_diagonal_linear_is_a_block_diagonal_matrix():
    layer = BlockDiagonalLinear(16, 4)
    torch.nn.init.normal_(layer.bias)
    dense = torch.block_diag(*layer.weight)  # [16, 16], block h maps x[4h:4h+4] -> y[4h:4h+4]
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_block_diagonal_implementations_agree_with_gradients(monkeypatch, bias):
    """The grouped-convolution and dense forms compute the einsum form's map and gradients, on a non-contiguous
    input (the model feeds a chunk of proj_up's output); dense in one group and in several."""
    layer = BlockDiagonalLinear(24, 4, bias=bias).double()
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 5, 48, dtype=torch.float64)[..., :24].requires_grad_()
    results = []
    for impl, group_max in (("einsum", 0), ("grouped_conv", 0), ("dense", 512), ("dense", 8)):
        monkeypatch.setattr(vil.layers.linear, "BLOCK_DIAGONAL_IMPL", impl)
        monkeypatch.setattr(vil.layers.linear, "DENSE_GROUP_MAX", group_max)
        y = layer(x)
        grads = torch.autograd.grad((y * torch.arange(24.0, dtype=y.dtype)).sum(), [x, *layer.parameters()])
        results.append((y, grads))
    assert layer.dense_group() == 8  # the last form ran in 3 groups of 8
    y_e, g_e = results[0]
    for y_other, g_other in results[1:]:
        assert y_other.shape == y_e.shape == (2, 3, 5, 24)
        torch.testing.assert_close(y_other, y_e)
        for a, b in zip(g_other, g_e):
            torch.testing.assert_close(a, b)


def test_block_diagonal_unknown_impl_is_refused(monkeypatch):
    monkeypatch.setattr(vil.layers.linear, "BLOCK_DIAGONAL_IMPL", "sparse")
    with pytest.raises(ValueError, match="BLOCK_DIAGONAL_IMPL must be one of"):
        BlockDiagonalLinear(8, 4)(torch.randn(2, 8))


@pytest.mark.parametrize("impl", ["grouped_conv", "dense"])
def test_vil_model_same_output_with_each_qkv_form(monkeypatch, impl):
    model = timm.create_model("vil_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        monkeypatch.setattr(vil.layers.linear, "BLOCK_DIAGONAL_IMPL", "einsum")
        expected = model(x)
        monkeypatch.setattr(vil.layers.linear, "BLOCK_DIAGONAL_IMPL", impl)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_multi_head_norm_is_group_norm_per_token():
    norm = MultiHeadLayerNorm(16, 4)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    h = torch.randn(2, 4, 5, 4) * 3 + 1  # [B, NH, S, DH]
    expected = F.group_norm(h.transpose(1, 2).reshape(10, 16), 4, norm.weight, norm.bias, 1e-5).reshape(2, 5, 16)
    torch.testing.assert_close(norm(h), expected)


def test_published_initialisation():
    dim, depth = 192, 4
    model = vil.VisionLSTM(embed_dim=dim, depth=depth, num_classes=1000)
    layer = model.blocks[1].layer
    small_std = math.sqrt(2 / (5 * dim))
    assert layer.proj_up.weight.std().item() == pytest.approx(small_std, rel=0.03)
    assert layer.q_proj.weight.std().item() == pytest.approx(small_std, rel=0.1)
    assert layer.proj_down.weight.std().item() == pytest.approx(2 / math.sqrt(dim), rel=0.03)
    assert torch.all(layer.proj_up.bias == 0) and torch.all(layer.q_proj.bias == 0)
    assert torch.all(layer.mlstm.fgate.weight == 0) and torch.all(layer.mlstm.igate.weight == 0)
    torch.testing.assert_close(layer.mlstm.fgate.bias, torch.linspace(3.0, 6.0, 4))
    assert 0 < layer.mlstm.igate.bias.abs().max() < 0.5
    assert torch.all(layer.learnable_skip == 1)
    for norm in (model.blocks[0].norm, layer.mlstm.norm, model.norm, model.fc_norm):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.1) and torch.all(model.head.bias == 0)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    fan_in, fan_out = 3 * 16 * 16, dim
    bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform on the flattened weight
    assert model.patch_embed.proj.weight.abs().max().item() <= bound
    assert model.patch_embed.proj.weight.abs().max().item() > 0.95 * bound
    deep = vil.VisionLSTM(embed_dim=dim, depth=depth, proj_down_init="depth", device="cpu")
    assert deep.blocks[0].layer.proj_down.weight.std().item() == pytest.approx(2 / depth / math.sqrt(dim), rel=0.03)


def test_drop_path_schedules():
    uniform = vil.VisionLSTM(embed_dim=32, depth=4, drop_path_rate=0.2, device="meta")
    assert [b.drop_path.drop_prob for b in uniform.blocks] == [0.2] * 4
    decay = vil.VisionLSTM(embed_dim=32, depth=4, drop_path_rate=0.3, drop_path_decay=True, device="meta")
    assert isinstance(decay.blocks[0].drop_path, torch.nn.Identity)
    assert [b.drop_path.drop_prob for b in decay.blocks[1:]] == pytest.approx([0.1, 0.2, 0.3])


def test_directions_alternate():
    """v1 layers are strictly causal along their reading direction: even sub-blocks cannot see later tokens (in
    image order), odd ones cannot see earlier ones."""
    model = small("vil1_tiny", depth=2).eval()
    x = torch.randn(1, 4, 4, 32)
    # a random bump: a constant one would vanish in the LayerNorm
    bumped_last = x.clone()
    bumped_last[:, -1, -1] += torch.randn(32)
    bumped_first = x.clone()
    bumped_first[:, 0, 0] += torch.randn(32)
    forward, backward = model.blocks[0], model.blocks[1]
    with torch.no_grad():
        assert torch.equal(forward(x)[:, :-1, :], forward(bumped_last)[:, :-1, :])
        assert not torch.allclose(backward(x)[:, 0, 0], backward(bumped_last)[:, 0, 0])
        assert torch.equal(backward(x)[:, 1:, :], backward(bumped_first)[:, 1:, :])
        assert not torch.allclose(forward(x)[:, -1, -1], forward(bumped_first)[:, -1, -1])


def test_conv_sees_the_two_dimensional_grid():
    """v2, forward direction on a 4x6 grid: token (2, 0) reaches the mLSTM first through the 3x3 conv at its
    upper neighbour (1, 0), sequence index 6 = 12 - W. Earlier tokens are untouched; from index 6 on they change.
    A conv along the sequence, or a grid with H and W swapped, would move that boundary."""
    layer = ViLLayer(32, reverse=False).eval()
    x = torch.randn(1, 4, 6, 32)
    bumped = x.clone()
    bumped[:, 2, 0] += torch.randn(32)
    with torch.no_grad():
        diff = (layer(x) - layer(bumped)).abs().amax(-1).flatten()  # [24], row-major
    assert torch.all(diff[:6] == 0) and torch.all(diff[6:] > 0)


def test_features_only():
    model = small(features_only=True, depth=6, img_size=(32, 48))
    feats = model(torch.randn(2, 3, 32, 48))
    assert model.feature_info.channels() == [32] * len(feats)
    assert model.feature_info.reduction() == [8] * len(feats)
    assert [f.shape for f in feats] == [(2, 32, 4, 6)] * len(feats)
    picked = small(features_only=True, out_indices=(1, 3), img_size=(32, 48))
    assert len(picked.model.blocks) == 4 and [f.shape for f in picked(torch.randn(1, 3, 32, 48))] == [(1, 32, 4, 6)] * 2
    assert timm.create_model("vil_base", features_only=True, device="meta").feature_info.module_name() == [
        "blocks.7",
        "blocks.11",
        "blocks.15",
        "blocks.23",
    ]


def test_forward_intermediates_are_image_ordered_maps():
    model = small(img_size=(32, 48)).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        for block in model.blocks:  # identity blocks: every intermediate is the embedded image itself
            block.layer.proj_down.weight.zero_()
            block.layer.proj_down.bias.zero_()
        embedded = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
        embedded = embedded + model.pos_embed.permute(0, 3, 1, 2)  # [B, D, 4, 6]
        final, inters = model.forward_intermediates(x)
    assert len(inters) == 4
    for y in inters:
        torch.testing.assert_close(y, embedded)
    torch.testing.assert_close(final, model.forward_features(x))


def test_forward_intermediates_locality_in_image_order():
    """Bump the bottom-right patch: after the first (top-left -> bottom-right) sub-block the top-left token is
    unchanged; after the second (reverse) sub-block it has changed. A map left in flipped order would fail this."""
    model = small(depth=2, img_size=(32, 48)).eval()
    x = torch.randn(1, 3, 32, 48)
    bumped = x.clone()
    bumped[..., 24:, 40:] += torch.randn(3, 8, 8)
    with torch.no_grad():
        a = model.forward_intermediates(x, intermediates_only=True)
        b = model.forward_intermediates(bumped, intermediates_only=True)
        nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
    assert torch.equal(a[0][..., 0, 0], b[0][..., 0, 0])
    assert not torch.allclose(a[0][..., -1, -1], b[0][..., -1, -1])
    assert not torch.allclose(a[1][..., 0, 0], b[1][..., 0, 0])
    torch.testing.assert_close(nlc[0], model.norm(a[1].flatten(2).transpose(1, 2)))


def test_prune_intermediate_layers():
    model = small().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        stopped = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1], prune_norm=True)
        pruned = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    assert kept == [0, 1] and len(model.blocks) == 2 and model.num_classes == 0
    assert isinstance(model.head, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.Identity)
    for a, b, c in zip(full, stopped, pruned):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_grad_checkpointing_gives_identical_outputs_and_grads():
    model = small(depth=2)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)
    _, inters = model.forward_intermediates(x)
    assert len(inters) == 2


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = small().to(torch.bfloat16).train()
    model.reset_classifier(7)
    assert model.head.weight.dtype == torch.bfloat16 and model.head.training and model.num_classes == 7
    assert model.get_classifier() is model.head
    model.eval()
    model.reset_classifier(5, global_pool="avg")
    assert model.head_hidden_size == 32 and model.fc_norm.weight.shape == (32,)
    assert not model.head.training and not model.fc_norm.training and model.fc_norm.weight.dtype == torch.bfloat16
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 5)
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 16, 32)
    meta = timm.create_model("vil_tiny", device="meta")
    meta.reset_classifier(3)
    assert meta.head.weight.device.type == "meta"


def test_set_input_size_and_dynamic_img_size():
    model = small(patch_size=16, depth=2, img_size=64).eval()
    x64 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x64)
        dynamic = small(patch_size=16, depth=2, img_size=64, dynamic_img_size=True).eval()
        dynamic.load_state_dict(model.state_dict())
        torch.testing.assert_close(dynamic(x64), ref)
        for size in ((160, 160), (96, 128)):
            x = torch.randn(2, 3, *size)
            out = dynamic(x)
            assert out.shape == (2, 10) and torch.isfinite(out).all()
            resized = small(patch_size=16, depth=2, img_size=64).eval()
            resized.load_state_dict(model.state_dict())
            resized.set_input_size(img_size=size)
            assert resized.pos_embed.shape == (1, size[0] // 16, size[1] // 16, 32)
            torch.testing.assert_close(resized(x), out)
            _, inters = dynamic.forward_intermediates(x)
            assert inters[0].shape == (2, 32, size[0] // 16, size[1] // 16)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 96, 128))
    model.set_input_size(patch_size=8)
    assert model.patch_embed.proj.weight.shape[-2:] == (8, 8) and model.pos_embed.shape[1:3] == (8, 8)
    assert model(x64).shape == (1, 10)


def test_bad_inputs_name_the_problem_and_the_fix():
    model = small().eval()
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="set_input_size"):
        model(torch.randn(1, 3, 40, 40))
    dynamic = small(dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match="height 36 does not tile into patches of 8"):
        dynamic(torch.randn(1, 3, 36, 32))


def test_bfloat16_cast():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_meta_device_construction_and_forward():
    model = timm.create_model("vil_tiny", device="meta", img_size=64, dynamic_img_size=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    out = model(torch.empty(2, 3, 96, 64, device="meta"))
    assert out.shape == (2, 1000) and out.device.type == "meta"
    model = vil.VisionLSTM(embed_dim=32, depth=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_torchscript():
    model = small(depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        with pytest.raises(Exception, match="in_chans=1"):
            scripted(torch.randn(1, 1, 32, 32))


def test_fx_tracing():
    model = small(depth=2, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        ref = model(x)
        plain = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(plain(x), ref)
        tracer = torch.fx.Tracer(autowrap_functions=tuple(get_notrace_functions()))
        traced = torch.fx.GraphModule(model, tracer.trace(model))
        torch.testing.assert_close(traced(x), ref)
    assert any("mlstm_op" in str(node.target) for node in traced.graph.nodes)


def test_optimizer_with_layer_decay_groups_pairs_of_sub_blocks():
    model = small(depth=6)
    assert model.no_weight_decay() == {"pos_embed"}
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[p] = (group["lr_scale"], group["weight_decay"])
    param = dict(model.named_parameters())
    # stem, three pairs, head -> 5 layers, scales 0.5 ** (4 - layer)
    assert scale_of[param["pos_embed"]] == (0.5**4, 0.0)
    assert scale_of[param["patch_embed.proj.weight"]] == (0.5**4, 0.05)
    assert scale_of[param["blocks.0.layer.proj_up.weight"]] == scale_of[param["blocks.1.layer.proj_up.weight"]]
    assert scale_of[param["blocks.1.layer.proj_up.weight"]] == (0.5**3, 0.05)
    assert scale_of[param["blocks.2.layer.proj_up.weight"]][0] == 0.5**2
    assert scale_of[param["blocks.5.layer.proj_up.weight"]][0] == 0.5
    assert scale_of[param["norm.weight"]] == (0.5, 0.0)
    assert scale_of[param["head.weight"]] == (1.0, 0.05)
    optimizer.zero_grad()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("impl", ["einsum", "grouped_conv", "dense"])
def test_vil_compiles_without_graph_breaks(monkeypatch, impl):
    """The recipes train with torch.compile: the whole model (either q/k/v form) is one graph, same outputs."""
    monkeypatch.setattr(vil.layers.linear, "BLOCK_DIAGONAL_IMPL", impl)
    torch._dynamo.reset()
    model = timm.create_model("vil_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
