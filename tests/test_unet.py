"""The paper's UNet (ddpm/unet.py): shapes, the CIFAR-10 parameter count, config errors, zero init, time embedding."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.unet import AttnBlock, ResBlock, UNet, UNetConfig, UNetConfigError, count_parameters, timestep_embedding



def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Move every weight off its (partly zero) initial value, so outputs depend on every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


CONFIGS = [
    # image_channels, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_groups
    (1, 8, 16, (1, 2), 1, (4,), 0.0, 8),
    (1, 8, 8, (1, 2, 2), 2, (8, 2), 0.1, 4),
    (3, 16, 8, (1, 2, 2), 1, (8,), 0.0, 8),
    (3, 32, 8, (1, 2, 2, 2), 1, (16,), 0.1, 8),
    (1, 28, 8, (1, 2, 2), 1, (7,), 0.0, 4),
    (3, 64, 8, (1, 1, 2, 2, 4), 1, (), 0.0, 8),
    (1, 12, 6, (1, 3), 2, (12, 6), 0.0, 3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}-ch{c[2]}-mult{'-'.join(map(str, c[3]))}")
def test_output_shape_equals_input_shape(cfg):
    torch.manual_seed(0)
    model = perturb(UNet(*cfg)).eval()
    c, s = cfg[0], cfg[1]
    x = torch.randn(2, c, s, s)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert not torch.equal(out[0], out[1])


def test_cifar10_unet_has_the_papers_parameter_count():
    with torch.device("meta"):  # counts only; no memory or init time for 35.7M weights
        model = UNet(3, 32, 128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert count_parameters(model) == 35_746_307


def test_parameter_count_of_a_minimal_net():
    """Hand count for the smallest net: every conv, norm, dense and attention weight and bias."""
    kwargs = {"image_channels": 1, "image_size": 4, "ch": 4, "ch_mult": (1,), "num_res_blocks": 1,
              "attn_resolutions": (), "num_groups": 2}
    model = UNet(**kwargs)
    ch, temb = 4, 16

    def conv(i, o, k):
        return i * o * k * k + o

    def res(i, o):
        return 2 * i + conv(i, o, 3) + temb * o + o + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attn(c):
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    hand = (ch * temb + temb) + (temb * temb + temb)  # time MLP
    hand += conv(1, ch, 3)  # conv_in
    hand += res(ch, ch)  # one down block, no downsample (single level)
    hand += res(ch, ch) + attn(ch) + res(ch, ch)  # middle
    hand += 2 * res(2 * ch, ch)  # num_res_blocks + 1 up blocks with concatenated skips
    hand += 2 * ch + conv(ch, 1, 3)  # norm_out, conv_out
    assert count_parameters(model) == hand


def test_init_output_is_exactly_zero():
    """The output conv and every residual/attention branch end start at zero (paper's code), so eps_theta == 0."""
    torch.manual_seed(0)
    model = UNet(3, 16, 8, (1, 2), 1, (8,), 0.0, 4).eval()
    assert torch.count_nonzero(model.conv_out.weight) == 0 and torch.count_nonzero(model.conv_out.bias) == 0
    for m in model.modules():
        if isinstance(m, ResBlock):
            assert torch.count_nonzero(m.conv2.weight) == 0 and torch.count_nonzero(m.conv2.bias) == 0
        if isinstance(m, AttnBlock):
            assert torch.count_nonzero(m.proj_out.weight) == 0 and torch.count_nonzero(m.proj_out.bias) == 0
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 5, 999]))
    assert torch.count_nonzero(out) == 0


def test_blocks_start_as_identity_or_skip():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    temb = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(ResBlock(8, 8, 32, 0.0, 4)(x, temb), x)
        block = ResBlock(8, 16, 32, 0.0, 4)
        assert torch.equal(block(x, temb), block.skip(x))
        assert torch.equal(AttnBlock(8, 4)(x), x)


def test_non_output_layers_use_xavier_uniform_and_zero_bias():
    torch.manual_seed(0)
    model = UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, 8)
    w = model.conv_in.weight.detach()
    fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.8 * bound
    assert torch.count_nonzero(model.conv_in.bias) == 0


def test_attention_matches_a_hand_computation():
    torch.manual_seed(0)
    block = perturb(AttnBlock(8, 4), scale=0.2)
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        h = torch.nn.functional.group_norm(x, 4, block.norm.weight, block.norm.bias)
        qkv = torch.einsum("oc,bchw->bohw", block.qkv.weight[:, :, 0, 0], h) + block.qkv.bias[None, :, None, None]
        q, k, v = (a.flatten(2) for a in qkv.chunk(3, dim=1))  # [B, C, HW]
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=-1)
        a = torch.einsum("bij,bcj->bci", w, v).reshape(x.shape)
        proj = torch.einsum("oc,bchw->bohw", block.proj_out.weight[:, :, 0, 0], a)
        out = x + proj + block.proj_out.bias[None, :, None, None]
        torch.testing.assert_close(block(x), out, rtol=1e-5, atol=1e-5)


def test_downsample_and_upsample_resolutions():
    torch.manual_seed(0)
    model = UNet(1, 16, 8, (1, 2, 2), 1, (), 0.0, 4)
    sizes = []
    hooks = [s.downsample.register_forward_hook(lambda m, i, o: sizes.append(("down", o.shape[-1])))
             for s in model.down if hasattr(s, "downsample")]
    hooks += [s.upsample.register_forward_hook(lambda m, i, o: sizes.append(("up", o.shape[-1])))
              for s in model.up if hasattr(s, "upsample")]
    with torch.no_grad():
        model(torch.randn(1, 1, 16, 16), torch.tensor([3]))
    assert sizes == [("down", 8), ("down", 4), ("up", 8), ("up", 16)]
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("ch", [2, 3])
def test_narrowest_nets_give_finite_output(ch):
    torch.manual_seed(0)
    model = perturb(UNet(1, 4, ch, (1, 2), 1, (2,), 0.0, 1)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 4, 4), torch.tensor([0, 50]))
    assert bool(torch.isfinite(out).all())


def test_output_depends_on_t():
    torch.manual_seed(0)
    model = perturb(UNet(1, 8, 8, (1, 2), 1, (), 0.0, 4)).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, 1, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 700]))
    assert (out[0] - out[1]).abs().max() > 1e-3


# -- config errors name the field ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"image_size": 30, "ch_mult": (1, 2, 2, 2)}, "image_size"),  # 30 is not divisible by 8
        ({"image_size": 28, "ch_mult": (1, 2, 2, 2)}, "image_size"),
        ({"image_size": 32, "attn_resolutions": (12,)}, "attn_resolutions"),
        ({"image_size": 32, "ch_mult": (1, 2), "attn_resolutions": (8,)}, "attn_resolutions"),
        ({"ch": 48, "num_groups": 32}, "num_groups"),
        ({"ch": 32, "ch_mult": (1, 3), "num_groups": 64}, "num_groups"),
        ({"ch": 0}, "ch"),
        ({"image_channels": 0}, "image_channels"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"ch_mult": (1, 0)}, "ch_mult"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_groups": 0}, "num_groups"),
        ({"image_size": 32.0}, "image_size"),
        ({"ch": True}, "ch"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(UNetConfigError) as exc:
        UNet(**kwargs)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")
    assert isinstance(exc.value, ValueError)


def test_config_error_messages_say_what_is_wrong():
    with pytest.raises(UNetConfigError, match=r"30 is not divisible by 8"):
        UNetConfig(image_size=30)
    with pytest.raises(UNetConfigError, match=r"\[32, 16, 8, 4\]"):
        UNetConfig(attn_resolutions=(12,))
    with pytest.raises(UNetConfigError, match=r"48 channels"):
        UNetConfig(ch=48)


def test_config_round_trips_through_a_dict():
    cfg = UNetConfig(1, 8, 16, [1, 2], 1, [4], 0.0, 8)
    d = cfg.to_dict()
    assert d == {"image_channels": 1, "image_size": 8, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
                 "attn_resolutions": [4], "dropout": 0.0, "num_groups": 8, "norm_eps": 1e-5}
    assert UNetConfig.from_dict(d) == cfg
    # a config stored before norm_eps existed reads as torch's GroupNorm default, what it was trained with
    assert UNetConfig.from_dict({k: v for k, v in d.items() if k != "norm_eps"}) == cfg
    model = UNet.from_config(d)
    assert model.config == cfg
    assert UNet.from_config(cfg).config == cfg
    with pytest.raises(UNetConfigError) as exc:
        UNetConfig.from_dict({**d, "width": 3})
    assert exc.value.field == "width"


def test_same_config_same_init_under_the_same_seed():
    torch.manual_seed(3)
    a = UNet(1, 8, 8, (1, 2), 1, (4,), 0.0, 4)
    torch.manual_seed(3)
    b = UNet.from_config(a.config.to_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# -- timestep embedding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3, 4, 16, 128, 33])
def test_timestep_embedding_values(dim):
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    half = dim // 2
    for row, tv in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000.0) * i / max(half - 1, 1))  # the paper's code: 1 ... 1/10000
            assert emb[row, i].item() == pytest.approx(math.sin(tv * freq), abs=2e-4)
            assert emb[row, half + i].item() == pytest.approx(math.cos(tv * freq), abs=2e-4)
    if dim % 2:
        assert torch.count_nonzero(emb[:, -1]) == 0
    # t = 0: sin half is 0, cos half is 1.
    assert torch.equal(emb[0, :half], torch.zeros(half))
    assert torch.equal(emb[0, half : 2 * half], torch.ones(half))


def test_timestep_embedding_pinned_slice():
    emb = timestep_embedding(torch.tensor([10]), 8)
    # freqs 1, 10^(-4/3), 10^(-8/3), 1e-4
    args = [10.0, 10 * 10 ** (-4 / 3), 10 * 10 ** (-8 / 3), 1e-3]
    expected = torch.tensor([math.sin(a) for a in args] + [math.cos(a) for a in args])
    torch.testing.assert_close(emb[0], expected, rtol=0, atol=1e-5)


def test_the_unet_is_described_once():
    """UNetConfig holds the library's defaults (the paper's CIFAR-10 network); UNet's arguments take the same ones.
    The params' model section keeps its own defaults: an empty params file means digits at 8x8, where the paper's
    network (attention at 16x16) does not fit."""
    import dataclasses
    import inspect

    from ddpm.unet import UNetConfig

    config = {f.name: f.default for f in dataclasses.fields(UNetConfig)}
    init = {k: p.default for k, p in inspect.signature(UNet.__init__).parameters.items() if k in config}
    assert init == config
    assert config["ch"] == 128 and config["ch_mult"] == (1, 2, 2, 2) and config["attn_resolutions"] == (16,)
