from __future__ import annotations

import pytest
import torch

from lidit.encoder import EncoderConfig, PromptEncoder, PromptTooLongError, features_from_parts

PROMPTS = ["a red circle to the left of a blue square", "two green triangles", "a small purple square"]


@pytest.fixture(scope="module", params=["llama", "qwen"])
def encoder(request: pytest.FixtureRequest, tiny_lm_paths: dict) -> PromptEncoder:
    cfg = EncoderConfig(
        name=request.param,
        path=str(tiny_lm_paths[request.param]),
        system_prompt="you are a helpful assistant",
    )
    return PromptEncoder(cfg)


def test_prefix_shared_equals_joint_pass(encoder: PromptEncoder) -> None:
    shared = encoder.encode_prompts(PROMPTS)
    joint = encoder.encode_joint(PROMPTS)
    assert torch.equal(shared.lengths, joint.lengths)
    assert encoder.prefix_len > 1
    torch.testing.assert_close(shared.states, joint.states, atol=1e-5, rtol=1e-5)


def test_prefix_states_match_joint_pass_prefix(encoder: PromptEncoder) -> None:
    ids = torch.tensor([encoder.prefix_ids])
    ref = encoder.model(input_ids=ids, output_hidden_states=True).hidden_states[-3][0]
    torch.testing.assert_close(encoder.prefix_states, ref)


def test_raw_causal_states_ignore_later_tokens(encoder: PromptEncoder) -> None:
    a = encoder.encode_prompts(["a red circle to the left of a blue square"]).states[0]
    b = encoder.encode_prompts(["a red circle to the left of a green triangle"]).states[0]
    n_same = 0
    ta = encoder.tokenizer("a red circle to the left of a blue square", add_special_tokens=False)["input_ids"]
    tb = encoder.tokenizer("a red circle to the left of a green triangle", add_special_tokens=False)[
        "input_ids"
    ]
    while ta[n_same] == tb[n_same]:
        n_same += 1
    assert n_same >= 3
    torch.testing.assert_close(a[:n_same], b[:n_same])  # causal: the shared start cannot see the change
    assert not torch.allclose(a[n_same], b[n_same])


def test_padding_does_not_change_real_tokens(encoder: PromptEncoder) -> None:
    alone = encoder.encode_prompts([PROMPTS[1]])
    batched = encoder.encode_prompts(PROMPTS)
    n = int(alone.lengths[0])
    assert int(batched.lengths[1]) == n and batched.states.shape[1] > n
    torch.testing.assert_close(batched.states[1, :n], alone.states[0, :n], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(batched.states[1, n:]) == 0  # padding is zeroed, never leaks


def test_layer_selection_and_validation(tiny_lm_paths: dict) -> None:
    path = str(tiny_lm_paths["llama"])
    last = PromptEncoder(EncoderConfig(name="x", path=path, layer=-1)).encode_prompts(PROMPTS[:1]).states
    third = PromptEncoder(EncoderConfig(name="x", path=path, layer=-3)).encode_prompts(PROMPTS[:1]).states
    assert not torch.allclose(last, third)
    with pytest.raises(ValueError, match="out of range"):
        PromptEncoder(EncoderConfig(name="x", path=path, layer=12))


def test_too_long_prompt_is_an_error_unless_truncating(tiny_lm_paths: dict) -> None:
    enc = PromptEncoder(EncoderConfig(name="x", path=str(tiny_lm_paths["qwen"]), max_length=4))
    with pytest.raises(PromptTooLongError, match="max_length=4"):
        enc.encode_prompts([PROMPTS[0]])
    assert int(enc.encode_prompts([PROMPTS[0]], truncate=True).lengths[0]) == 4


def test_fingerprint_tracks_instruction_and_layer_not_path(tiny_lm_paths: dict, tmp_path) -> None:
    import shutil

    path = tiny_lm_paths["llama"]
    base = PromptEncoder(EncoderConfig(name="x", path=str(path))).fingerprint
    assert PromptEncoder(EncoderConfig(name="x", path=str(path), instruction="Draw:")).fingerprint != base
    assert PromptEncoder(EncoderConfig(name="x", path=str(path), layer=-2)).fingerprint != base
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert PromptEncoder(EncoderConfig(name="x", path=str(copy))).fingerprint == base


def test_features_layout(encoder: PromptEncoder) -> None:
    feats = encoder.features(PROMPTS)
    enc = encoder.encode_prompts(PROMPTS)
    p = encoder.prefix_len
    assert feats.prefix_len == p
    assert feats.mask[:, :p].all()
    assert feats.mask.sum(1).tolist() == (enc.lengths + p).tolist()
    torch.testing.assert_close(feats.states[0, :p], encoder.prefix_states)
    again = features_from_parts(encoder.prefix_states, enc.unpadded())
    torch.testing.assert_close(again.states, feats.states)


def test_missing_model_dir_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        PromptEncoder(EncoderConfig(name="x", path=str(tmp_path / "nope")))


def test_prefix_sharing_uses_the_cache_api_that_stays(encoder: PromptEncoder) -> None:
    """No deprecated `past_key_values=` on either starter family (transformers removes it in 5.40)."""
    import warnings

    from transformers.cache_utils import Cache

    assert isinstance(encoder._prefix[1], Cache)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        encoder.encode_prompts(PROMPTS)
    assert not [w for w in seen if "past_key_values" in str(w.message)]


def test_token_spans_line_up_with_the_prompt_states(encoder: PromptEncoder) -> None:
    spans = encoder.token_spans(PROMPTS)
    lengths = encoder.encode_prompts(PROMPTS).lengths.tolist()
    assert [len(s) for s in spans] == lengths  # one span per prompt state
    for prompt, prompt_spans in zip(PROMPTS, spans, strict=True):
        assert "".join(prompt[a:b] for a, b in prompt_spans).strip() == prompt  # they cover the text in order
