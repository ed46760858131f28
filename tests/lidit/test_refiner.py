from __future__ import annotations

import torch

from lidit.refiner import CollaborativeRefiner, LinguisticTokenRefiner


def _randomize_gates(module: torch.nn.Module) -> None:
    """Training moves the zero-init gates away from 0; emulate that to test the attention pattern."""
    for name, p in module.named_parameters():
        if "gates" in name or "ada" in name:
            torch.nn.init.normal_(p, std=0.5)


def _inputs(b: int = 2, t: int = 7, d: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(b, t, d), torch.ones(b, t, dtype=torch.bool), torch.randn(b, 32)


def test_refiner_is_identity_on_projected_tokens_at_init() -> None:
    refiner = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=2, heads=4)
    states, mask, t_emb = _inputs()
    torch.testing.assert_close(refiner(states, mask, t_emb), refiner.proj(states))


def test_refined_token_sees_later_tokens_bidirectional() -> None:
    refiner = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=2, heads=4)
    _randomize_gates(refiner)
    states, mask, t_emb = _inputs(b=1)
    changed = states.clone()
    changed[0, -1] += 1.0  # change only the last token
    a, b = refiner(states, mask, t_emb), refiner(changed, mask, t_emb)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # the first token noticed


def test_causal_refiner_ablation_does_not_see_later_tokens() -> None:
    refiner = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=2, heads=4, causal=True)
    _randomize_gates(refiner)
    states, mask, t_emb = _inputs(b=1)
    changed = states.clone()
    changed[0, -1] += 1.0
    # the pooled condition still sees the whole prompt; freeze it to isolate the attention pattern
    refiner.pool_mlp = torch.nn.Sequential(torch.nn.Linear(24, 32))
    torch.nn.init.zeros_(refiner.pool_mlp[0].weight)
    a, b = refiner(states, mask, t_emb), refiner(changed, mask, t_emb)
    torch.testing.assert_close(a[0, :-1], b[0, :-1])


def test_padding_does_not_change_real_tokens() -> None:
    refiner = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=2, heads=4)
    _randomize_gates(refiner)
    states, mask, t_emb = _inputs(b=1, t=5)
    padded = torch.cat([states, torch.randn(1, 3, 24)], dim=1)  # garbage in the padding
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(refiner(padded, padded_mask, t_emb)[:, :5], refiner(states, mask, t_emb))


def test_depth_zero_is_projection_only() -> None:
    refiner = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=0)
    states, mask, t_emb = _inputs()
    torch.testing.assert_close(refiner(states, mask, t_emb), refiner.proj(states))


def test_collaborative_refiner_identity_at_init_and_fuses_after_training() -> None:
    collab = CollaborativeRefiner(num_branches=2, dim=32, heads=4)
    a, b = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    masks = [torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)]
    c = torch.randn(2, 32)
    out = collab([a, b], masks, c)
    torch.testing.assert_close(out[0], a)
    torch.testing.assert_close(out[1], b)
    _randomize_gates(collab)
    b2 = b.clone()
    b2[:, 0] += 1.0
    before, after = collab([a, b], masks, c)[0], collab([a, b2], masks, c)[0]
    assert (before - after).abs().max() > 1e-4  # branch A reads branch B


def test_keep_from_computes_only_the_kept_tokens_with_the_same_values() -> None:
    # The generator asks the last text layer for the prompt tokens only (the prefix is dropped before the
    # DiT): the result must equal slicing the full output, prefix tokens still acting as keys.
    states, t_emb = torch.randn(2, 9, 24), torch.randn(2, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, -2:] = False  # a padded row
    for causal in (False, True):
        refiner = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=2, heads=4, causal=causal)
        _randomize_gates(refiner)
        kept = refiner(states, mask, t_emb, keep_from=4)
        assert kept.shape == (2, 5, 32)
        torch.testing.assert_close(kept, refiner(states, mask, t_emb)[:, 4:])
    collab = CollaborativeRefiner(num_branches=2, dim=32, heads=4)
    _randomize_gates(collab)
    a, b, c = torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 32)
    masks = [torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)]
    full, kept = collab([a, b], masks, c), collab([a, b], masks, c, keep_from=[2, 3])
    torch.testing.assert_close(kept[0], full[0][:, 2:])
    torch.testing.assert_close(kept[1], full[1][:, 3:])


def test_position_switch_makes_the_refiner_see_word_order() -> None:
    """Without positions the bidirectional refiner is permutation-equivariant: reordering the tokens only
    reorders its output, so "A left of B" and "B left of A" differ only through the LLM states. With
    `position=True` the order itself changes the refined tokens, and it stays the identity at init."""
    states, mask, t_emb = _inputs(b=1)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    plain = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=2, heads=4)
    _randomize_gates(plain)
    torch.testing.assert_close(plain(states[:, perm], mask, t_emb), plain(states, mask, t_emb)[:, perm])

    positioned = LinguisticTokenRefiner(llm_dim=24, dim=32, depth=2, heads=4, position=True)
    torch.testing.assert_close(positioned(states, mask, t_emb), positioned.proj(states))  # identity at init
    _randomize_gates(positioned)
    reordered = positioned(states[:, perm], mask, t_emb)
    assert (reordered - positioned(states, mask, t_emb)[:, perm]).abs().max() > 1e-3
    # keep_from still computes exactly the kept tokens' values with positions on
    torch.testing.assert_close(
        positioned(states, mask, t_emb, keep_from=3), positioned(states, mask, t_emb)[:, 3:]
    )
