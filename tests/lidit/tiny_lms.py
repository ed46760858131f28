"""Tiny real models for foundation tests: a BPE tokenizer trained here, random Llama / Qwen2 models and a random
VAE, saved with `save_pretrained` and loaded back through `from_pretrained` like real checkpoints (nothing from
a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "a red circle to the left of a blue square",
    "two green triangles above a yellow circle",
    "describe the image by detailing the color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects:",
    "a small purple square below three orange circles",
    "you are a helpful assistant that describes images",
] * 20


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    return fast


def build_tiny_lms(root: Path) -> dict[str, Path]:
    """Save a Llama (width 48) and a Qwen2 (width 64) causal LM with the tokenizer beside each."""
    import torch

    torch.manual_seed(0)
    tok = build_tokenizer(root / "tokenizer")
    common = dict(vocab_size=len(tok), num_hidden_layers=4, max_position_embeddings=256, pad_token_id=0)
    lms = {
        "llama": LlamaForCausalLM(
            LlamaConfig(
                hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **common
            )
        ),
        "qwen": Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common
            )
        ),
    }
    paths = {}
    for name, lm in lms.items():
        path = root / name
        lm.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


def save_tiny_vae(out: Path, seed: int = 0) -> Path:
    """A random diffusers VAE (64x64 -> 4x32x32), saved to `out`."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(out)
    return out
