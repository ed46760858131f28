from __future__ import annotations

import pytest
import torch

from lidit.generator import GeneratorConfig, LiDiTGenerator, TextBranchSpec, TextFeatures, count_parameters
from lidit.layers import MLP
from lidit.presets import PRESETS

BRANCHES = [TextBranchSpec(name="llama", hidden_size=48), TextBranchSpec(name="qwen", hidden_size=64)]


def _texts(
    b: int = 2, prefix: tuple[int, int] = (4, 3), lens: tuple[int, int] = (6, 8)
) -> list[TextFeatures]:
    out = []
    for spec, p, n in zip(BRANCHES, prefix, lens, strict=True):
        mask = torch.ones(b, p + n, dtype=torch.bool)
        out.append(TextFeatures(torch.randn(b, p + n, spec.hidden_size), mask, p))
    return out


def _trained_like(model: LiDiTGenerator) -> LiDiTGenerator:
    for name, p in model.named_parameters():
        if "ada" in name or "gates" in name or "final.linear" in name or "head_out" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("conv_channels", [0, 16])
def test_output_shape_and_zero_init(conv_channels: int) -> None:
    model = LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES, conv_channels=conv_channels))
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([10.0, 900.0]), _texts())
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final layer (and the conv head's) starts at zero


@pytest.mark.parametrize("overrides", [{}, {"conv_channels": 16}, {"mlp_conv": True}])
@pytest.mark.parametrize("size", [(8, 8), (16, 24), (32, 16)])
def test_any_latent_size_divisible_by_patch(size: tuple[int, int], overrides: dict) -> None:
    config = GeneratorConfig.from_preset("tiny", BRANCHES, **overrides)
    model = _trained_like(LiDiTGenerator(config))
    x = torch.randn(1, 4, *size)
    assert model(x, torch.tensor([500.0]), _texts(b=1)).shape == x.shape


def test_latent_size_not_divisible_is_a_clear_error() -> None:
    model = LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model(torch.randn(1, 4, 15, 16), torch.tensor([1.0]), _texts(b=1))


def test_text_padding_does_not_change_output() -> None:
    model = _trained_like(LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES)))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    texts = _texts(b=1)
    padded = []
    for f in texts:
        extra = torch.randn(1, 5, f.states.shape[-1])
        padded.append(
            TextFeatures(
                torch.cat([f.states, extra], 1),
                torch.cat([f.mask, torch.zeros(1, 5, dtype=torch.bool)], 1),
                f.prefix_len,
            )
        )
    torch.testing.assert_close(model(x, t, padded), model(x, t, texts), atol=1e-5, rtol=1e-4)


def test_padded_to_multiple_adds_masked_zero_tokens() -> None:
    feats = _texts(b=2)[0]  # 4 prefix + 6 prompt tokens
    padded = feats.padded_to_multiple(8)
    assert padded.states.shape == (2, 16, feats.states.shape[-1]) and padded.prefix_len == 4
    assert torch.equal(padded.states[:, :10], feats.states) and not padded.states[:, 10:].any()
    assert torch.equal(padded.mask[:, :10], feats.mask) and not padded.mask[:, 10:].any()
    assert feats.padded_to_multiple(5) is feats  # already a multiple
    assert feats.padded_to_multiple(1) is feats


def test_prefix_tokens_do_not_reach_the_backbone_directly() -> None:
    model = LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES))
    texts = _texts(b=2, prefix=(4, 3), lens=(6, 8))
    t_emb = torch.randn(2, model.config.dim)
    tokens, mask = model.encode_text(texts, t_emb)
    assert tokens.shape[1] == 6 + 8 + 1  # prompt tokens of both branches + the null token
    assert mask.all()


def test_empty_prompt_without_prefix_is_finite() -> None:
    model = _trained_like(LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES)))
    texts = [f.drop_prompt(torch.ones(2, dtype=torch.bool)) for f in _texts(prefix=(0, 0))]
    assert not texts[0].mask.any()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([5.0, 6.0]), texts)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "overrides",
    [
        {"fusion": "concat"},
        {"refiner_position": True},
        {"layout_head": True},
        {"layout_head": True, "layout_attention": True},
        {"conv_channels": 16},
        {"mlp_conv": True},
        {"mlp_conv": True, "mlp_activation": "gelu"},
    ],
)
def test_save_load_round_trip_is_exact(tmp_path, overrides: dict) -> None:
    model = _trained_like(LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES, **overrides)))
    assert all(r.position == overrides.get("refiner_position", False) for r in model.refiners)
    model.save_pretrained(tmp_path / "gen")
    loaded = LiDiTGenerator.from_pretrained(tmp_path / "gen")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x, t, texts = torch.randn(1, 4, 8, 8), torch.tensor([42.0]), _texts(b=1)
    assert torch.equal(model(x, t, texts), loaded(x, t, texts))


def test_exact_gelu_reaches_every_mlp_and_keeps_the_weights() -> None:
    tanh = _trained_like(LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES)))
    exact = LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES, mlp_activation="gelu"))
    exact.load_state_dict(tanh.state_dict(), strict=True)  # no weight depends on the activation
    mlps = [m for m in exact.modules() if isinstance(m, MLP)]
    assert len(mlps) == len([m for m in tanh.modules() if isinstance(m, MLP)]) > 4  # refiners' and blocks'
    assert all(m.act.approximate == "none" for m in mlps)
    assert all(m.act.approximate == "tanh" for m in tanh.modules() if isinstance(m, MLP))
    x, t, texts = torch.randn(2, 4, 8, 8), torch.tensor([42.0, 700.0]), _texts(b=2)
    a, b = tanh(x, t, texts), exact(x, t, texts)
    assert not torch.equal(a, b)  # the activation took effect
    assert torch.allclose(a, b, atol=0.02 * a.abs().max().item())  # the same curve within ~1e-3 per unit


def test_single_llm_skips_collaborative_refiner() -> None:
    model = LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES[:1]))
    assert model.collaborative is None
    assert (
        LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES, fusion="concat")).collaborative is None
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GeneratorConfig(encoders=BRANCHES, dim=30, heads=4)
    with pytest.raises(ValueError, match="unique"):
        GeneratorConfig(encoders=[BRANCHES[0], BRANCHES[0]])
    with pytest.raises(ValueError, match="unknown preset"):
        GeneratorConfig.from_preset("huge", BRANCHES)


def test_paper_presets_parameter_counts() -> None:
    llms = [TextBranchSpec(name=f"l{i}", hidden_size=4096) for i in range(2)]
    one_b = count_parameters(GeneratorConfig.from_preset("LI-DiT-1B", llms[:1]))
    ten_b = count_parameters(GeneratorConfig.from_preset("LI-DiT-10B", llms))
    assert 0.9e9 < one_b < 1.2e9
    assert 9.5e9 < ten_b < 11e9
    assert PRESETS["LI-DiT-1B"].depth == 28 and PRESETS["LI-DiT-10B"].heads == 44


def test_sincos_grid_gives_every_token_its_own_position() -> None:
    from lidit.dit import sincos_2d

    pos = sincos_2d(96, 5, 7, torch.device("cpu"), torch.float32)  # (35, 96): any grid, no table
    assert pos.shape == (35, 96)
    dists = torch.cdist(pos, pos) + torch.eye(35) * 1e9
    assert dists.min() > 0.1  # no two tokens of the grid share an embedding
    # The same cell has the same embedding in a larger grid (positions extend, they are not rescaled).
    torch.testing.assert_close(sincos_2d(96, 8, 7, torch.device("cpu"), torch.float32)[:35], pos)


def test_layout_head_reads_every_prompt_token_and_leaves_sampling_alone() -> None:
    torch.manual_seed(0)
    plain = LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES))
    assert not any(k.startswith("layout_head") for k in plain.state_dict())  # default weights: unchanged keys
    x, t, texts = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), _texts()
    with pytest.raises(ValueError, match="layout_head"):
        plain(x, t, texts, with_layout=True)
    model = _trained_like(LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES, layout_head=True)))
    pred, layout = model(x, t, texts, with_layout=True)
    assert layout.shape == (2, 6 + 8, 2)  # both branches' prompt tokens, no prefix, no null token
    assert torch.equal(pred, model(x, t, texts))


def test_layout_attention_leans_image_tokens_towards_their_side_s_words() -> None:
    with pytest.raises(ValueError, match="layout_head"):
        GeneratorConfig.from_preset("tiny", BRANCHES, layout_attention=True)
    torch.manual_seed(0)
    dit = _trained_like(LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES))).backbone
    torch.manual_seed(0)
    leaning = _trained_like(
        LiDiTGenerator(GeneratorConfig.from_preset("tiny", BRANCHES, layout_head=True, layout_attention=True))
    ).backbone
    leaning.load_state_dict(dit.state_dict(), strict=False)  # same weights; the layout scales start at 0
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 96)
    text, mask = torch.randn(2, 5, 96), torch.ones(2, 5, dtype=torch.bool)
    offsets = torch.zeros(2, 5, 2)
    offsets[:, 1] = torch.tensor([-1.0, 0.0])  # token 1 names a left object
    # Zero scales: no change (a float attention mask takes another kernel path: equal to rounding).
    same = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(leaning(x, c, text, mask, offsets), dit(x, c, text, mask), **same)
    with torch.no_grad():
        for block in leaning.blocks:
            block.layout_scale.fill_(3.0)
    no_place = leaning(x, c, text, mask, torch.zeros(2, 5, 2))
    torch.testing.assert_close(no_place, dit(x, c, text, mask), **same)  # offsets 0: no lean
    assert not torch.allclose(leaning(x, c, text, mask, offsets), dit(x, c, text, mask), atol=1e-3)


def test_attention_bias_routes_queries_and_keeps_the_padding_out() -> None:
    from lidit.layers import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2)
    x, context = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    key_mask = torch.tensor([[True, True, True, False]])
    bias = torch.zeros(1, 2, 3, 4)
    torch.testing.assert_close(attn(x, context, key_mask, bias=bias), attn(x, context, key_mask))
    only_key_1 = attn(x, context[:, 1:2])  # one key: what a query attending only to key 1 returns
    bias[..., 1] = 50.0
    routed = attn(x, context, key_mask, bias=bias)
    torch.testing.assert_close(routed, only_key_1.expand_as(routed), atol=1e-4, rtol=1e-4)
    bias[..., 3] = 100.0  # a padded key stays out whatever its bias
    torch.testing.assert_close(attn(x, context, key_mask, bias=bias), routed)
