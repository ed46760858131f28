"""The starter tokenizer and two tiny causal LMs of different families, trained on the starter captions.

They are small but real: standard `transformers` classes saved with `save_pretrained` (safetensors), loaded back
by `AutoTokenizer` / `AutoModelForCausalLM` exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lidit.starter.config import LMArchConfig, LMConfig, TokenizerConfig

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_tokenizer(texts: list[str], cfg: TokenizerConfig, out_dir: str | Path | None = None) -> Any:
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast` (saved to `out_dir` if given).

    Byte-level, so any text (a user prompt, the instruction) encodes without unknown tokens. Like Llama
    tokenizers it prepends `<s>` when called with special tokens; `</s>` ends training samples; `<pad>` pads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right"
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_lm(arch: LMArchConfig, tokenizer: Any, max_positions: int = 512) -> Any:
    """A freshly initialised tiny causal LM of `arch.family` sized for `tokenizer`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # half the parameters of a tiny LM would otherwise be the output head
    )
    config = LlamaConfig(**common) if arch.family == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(config)


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length - 1)["input_ids"]
    return [seq + [tokenizer.eos_token_id] for seq in ids]


def _batch(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def perplexity(
    model: Any, tokenizer: Any, texts: list[str], max_length: int = 64, batch_size: int = 64
) -> float:
    """Token-level perplexity of `texts` (each `<s> text </s>`), predicting every token after `<s>`."""
    import torch

    seqs = _encode(tokenizer, texts, max_length)
    nll, n_tok = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask, labels = _batch(seqs[i : i + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            nll += float(loss)
            n_tok += int((target != -100).sum())
    return math.exp(nll / max(n_tok, 1))


def train_lm(
    arch: LMArchConfig,
    cfg: LMConfig,
    tokenizer: Any,
    train_texts: list[str],
    eval_texts: list[str],
    seed: int,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[Any, dict[str, Any]]:
    """Train one tiny LM with next-token loss; returns the model and its metrics (held-out perplexity)."""
    import torch

    torch.manual_seed(seed)
    model = build_lm(arch, tokenizer)
    rng = random.Random(seed)
    # A share of samples carry the encoder's instruction in front, as the prompt encoder will feed them.
    texts = [f"{cfg.instruction} {t}" if rng.random() < cfg.instruction_prob else t for t in train_texts]
    seqs = _encode(tokenizer, texts, cfg.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 5%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    ppl_before = perplexity(model, tokenizer, eval_texts, cfg.max_length)
    model.train()
    order: list[int] = []
    t0 = time.perf_counter()
    loss_val = float("nan")
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # epochs over a seeded shuffle
            fresh = list(range(len(seqs)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [seqs[order.pop()] for _ in range(cfg.batch_size)]
        ids, mask, labels = _batch(batch, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = float(loss.detach())
        if (step + 1) % max(1, cfg.steps // 4) == 0 or step + 1 == cfg.steps:
            log(
                f"lm_{arch.family}: step {step + 1}/{cfg.steps} loss {loss_val:.3f} ({time.perf_counter() - t0:.1f}s)"
            )
    model.eval()
    ppl = perplexity(model, tokenizer, eval_texts, cfg.max_length)
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {
        "family": arch.family,
        "params": n_params,
        "hidden_size": arch.hidden_size,
        "num_layers": arch.num_layers,
        "vocab_size": len(tokenizer),
        "train_loss_last": round(loss_val, 4),
        "heldout_perplexity_init": round(ppl_before, 3),
        "heldout_perplexity": round(ppl, 3),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    return model, metrics


def save_lm(model: Any, tokenizer: Any, out_dir: str | Path) -> None:
    """`save_pretrained` the model (safetensors) with the tokenizer files beside it."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise in the build log
    try:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
