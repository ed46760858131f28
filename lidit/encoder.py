"""Prompt encoding with frozen decoder-only LLMs and usage guidance (LI-DiT section 3.1).

The text an LLM reads is `[system prompt][instruction][user prompt]`; features are the hidden states of one
block (default the third-to-last, `hidden_states[-3]`).

Prefix sharing (ours): in a causal LM the prefix's hidden states do not depend on what follows. We tokenize the
prefix and the prompt separately and concatenate the ids (so "the text" is exactly prefix ids + prompt ids),
run the prefix once, and reuse its key/value cache for every batch of prompts. The prompt tokens' states equal
those of one joint pass (checked in tests) and the prefix states are stored once, not once per sample.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lidit.config import StrictModel
from lidit.fingerprint import hash_json, hash_model_dir
from lidit.generator import TextBranchSpec, TextFeatures
from lidit.instruction import DEFAULT_INSTRUCTION

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EncoderConfig(StrictModel):
    """One frozen LLM prompt encoder (config, per encoder)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$", description="column-safe short name")
    path: str = Field(min_length=1, description="local directory of a Hugging Face causal LM + tokenizer")
    system_prompt: str = ""
    instruction: str = DEFAULT_INSTRUCTION
    layer: int = Field(-3, description="index into hidden_states; -3 = third-to-last block (paper)")
    max_length: int = Field(128, gt=0, description="maximum prompt tokens (prefix not counted)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class EncodedPrompts:
    """Prompt-token states (prefix excluded), right-padded: states (B, L, D), lengths (B,)."""

    states: torch.Tensor
    lengths: torch.Tensor

    def unpadded(self) -> list[torch.Tensor]:
        """Per-prompt (L_i, D) tensors, the variable-length form the cache stores."""
        return [s[:n] for s, n in zip(self.states, self.lengths.tolist(), strict=True)]


def encoder_fingerprint(config: EncoderConfig) -> str:
    """`PromptEncoder.fingerprint` without loading the model (reads the files only while their hash is unknown)."""
    cfg = config.model_dump()
    cfg.pop("path")  # where the files live does not change the features
    cfg.pop("name")
    return hash_json({"model": hash_model_dir(config.path), "config": cfg})[:16]


class PromptTooLongError(ValueError):
    """A prompt has more tokens than `max_length`."""


class PromptEncoder:
    """A frozen causal LM + tokenizer loaded by path, with usage guidance and prefix sharing."""

    def __init__(self, config: EncoderConfig, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        path = Path(config.path)
        if not path.is_dir():
            raise FileNotFoundError(f"encoder {config.name!r}: model directory not found: {path}")
        hf_logging.disable_progress_bar()  # per-checkpoint progress bars drown a build's own progress output
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[config.dtype])
        # The LM head is never used: keep only the decoder stack (saves memory on big vocabularies).
        # `base_model` (the `model.` submodule) on every release; `get_decoder()` is None on some 4.x CausalLMs.
        self.model = lm.base_model
        self.model.to(self.device).eval().requires_grad_(False)
        num_layers = self.model.config.num_hidden_layers
        if not -(num_layers + 1) <= config.layer <= num_layers:
            raise ValueError(
                f"encoder {config.name!r}: layer {config.layer} out of range for {num_layers} blocks"
            )
        self.prefix_ids = self._prefix_ids()
        # transformers >= 5.24 takes the key/value cache as `cache=` (a `Cache` object, here a DynamicCache) and
        # removes `past_key_values=` in 5.40; releases before 5.24 only know `past_key_values=`.
        self._cache_arg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        self.calls = 0  # number of encode batches run; the cache tests count recomputation with it

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    def branch_spec(self) -> TextBranchSpec:
        return TextBranchSpec(name=self.name, hidden_size=self.hidden_size)

    def _prefix_ids(self) -> list[int]:
        ids: list[int] = []
        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
        for part in (self.config.system_prompt, self.config.instruction):
            if part:
                ids.extend(self.tokenizer(part, add_special_tokens=False)["input_ids"])
        return ids

    @cached_property
    def fingerprint(self) -> str:
        """Weights + config + tokenizer + layer + prefix text + dtype: any change means new features."""
        return encoder_fingerprint(self.config)

    def token_lengths(self, prompts: list[str]) -> list[int]:
        """Number of prompt tokens (no prefix, no special tokens) of each prompt."""
        return [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]

    @torch.no_grad()
    def _prefix_pass(self) -> tuple[torch.Tensor, object]:
        ids = torch.tensor([self.prefix_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, output_hidden_states=True)
        cache = getattr(out, "cache", None)  # a DynamicCache, named `cache` from transformers 5.24 on
        if cache is None:
            cache = out.past_key_values
        return out.hidden_states[self.config.layer][0], cache

    @cached_property
    def _prefix(self) -> tuple[torch.Tensor, object]:
        return self._prefix_pass()

    @property
    def prefix_states(self) -> torch.Tensor:
        """States of the shared prefix, (P, D); computed once per encoder."""
        if self.prefix_len == 0:
            return torch.zeros(0, self.hidden_size, device=self.device, dtype=DTYPES[self.config.dtype])
        return self._prefix[0]

    def token_spans(self, prompts: list[str]) -> list[list[tuple[int, int]]]:
        """Character span `(start, end)` of every prompt token, as `encode_prompts` tokenizes (and truncates)
        them: entry i of a prompt's list belongs to its i-th prompt state."""
        enc = self.tokenizer(list(prompts), add_special_tokens=False, return_offsets_mapping=True)
        return [[tuple(span) for span in spans[: self.config.max_length]] for spans in enc["offset_mapping"]]

    def _tokenize(self, prompts: list[str], truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        too_long = [i for i, x in enumerate(ids) if len(x) > self.config.max_length]
        if too_long and not truncate:
            i = too_long[0]
            raise PromptTooLongError(
                f"prompt {i} has {len(ids[i])} tokens, more than max_length={self.config.max_length}"
            )
        ids = [x[: self.config.max_length] for x in ids]
        longest = max(1, max(len(x) for x in ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.bool)
        for row, x in enumerate(ids):
            batch[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = True
        return batch.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], truncate: bool = False) -> EncodedPrompts:
        """States of the prompt tokens only, reusing the prefix's key/value cache."""
        if not prompts:
            raise ValueError("no prompts to encode")
        self.calls += 1
        ids, mask = self._tokenize(prompts, truncate)
        b, length = ids.shape
        p = self.prefix_len
        if p == 0:
            out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        else:
            cache = copy.deepcopy(self._prefix[1])  # a cache is consumed by the call that extends it
            cache.batch_repeat_interleave(b)
            full_mask = torch.cat(
                [torch.ones(b, p, dtype=torch.long, device=self.device), mask.long()], dim=1
            )
            positions = torch.arange(p, p + length, device=self.device).unsqueeze(0).expand(b, -1)
            out = self.model(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=positions,
                output_hidden_states=True,
                **{self._cache_arg: cache},
            )
        states = out.hidden_states[self.config.layer] * mask.unsqueeze(-1)  # zero the padding
        return EncodedPrompts(states, mask.sum(1))

    @torch.no_grad()
    def encode_joint(self, prompts: list[str], truncate: bool = False) -> EncodedPrompts:
        """Reference path without prefix sharing: one pass over prefix + prompt ids per batch."""
        ids, mask = self._tokenize(prompts, truncate)
        b = ids.shape[0]
        prefix = torch.tensor([self.prefix_ids] * b, dtype=torch.long, device=self.device).view(b, -1)
        full_ids = torch.cat([prefix, ids], dim=1)
        full_mask = torch.cat([torch.ones_like(prefix, dtype=torch.bool), mask], dim=1)
        out = self.model(input_ids=full_ids, attention_mask=full_mask.long(), output_hidden_states=True)
        states = out.hidden_states[self.config.layer][:, self.prefix_len :] * mask.unsqueeze(-1)
        return EncodedPrompts(states, mask.sum(1))

    def features(self, prompts: list[str], truncate: bool = False) -> TextFeatures:
        """What the generator consumes: prefix + prompt states (B, P+L, D) with the padding mask."""
        enc = self.encode_prompts(prompts, truncate)
        return features_from_parts(self.prefix_states, enc.unpadded())


def features_from_parts(prefix: torch.Tensor, prompts: list[torch.Tensor]) -> TextFeatures:
    """Assemble generator input from the shared prefix (P, D) and per-prompt (L_i, D) states.

    The cache reader, the training collate and serving all go through here, so the layout is defined once.
    """
    b = len(prompts)
    p, d = prefix.shape
    longest = max(1, max(x.shape[0] for x in prompts))
    states = prefix.new_zeros(b, p + longest, d)
    mask = torch.zeros(b, p + longest, dtype=torch.bool, device=prefix.device)
    states[:, :p] = prefix
    mask[:, :p] = True
    for i, x in enumerate(prompts):
        states[i, p : p + x.shape[0]] = x.to(states.dtype)
        mask[i, p : p + x.shape[0]] = True
    return TextFeatures(states, mask, p)
