from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lidit.starter import DEFAULT_INSTRUCTION


def test_tokenizer_loads_with_autotokenizer(starter_micro) -> None:
    for path in (starter_micro.tokenizer, starter_micro.lm_llama, starter_micro.lm_qwen2):
        tok = AutoTokenizer.from_pretrained(path)
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        ids = tok("a red circle to the left of two blue squares")["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == "a red circle to the left of two blue squares"
        # Byte-level: any text encodes and decodes, including the encoder instruction.
        plain = tok(DEFAULT_INSTRUCTION + " Ünïcode?", add_special_tokens=False)["input_ids"]
        assert tok.decode(plain) == DEFAULT_INSTRUCTION + " Ünïcode?"


def test_two_lm_families_load_and_give_hidden_states(starter_micro) -> None:
    tok = AutoTokenizer.from_pretrained(starter_micro.tokenizer)
    ids = tok(["a small green diamond above a cyan circle"], return_tensors="pt")
    widths = {}
    for family in ("llama", "qwen2"):
        path = starter_micro.lm(family)
        assert (path / "model.safetensors").is_file()
        assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # no pickles
        lm = AutoModelForCausalLM.from_pretrained(path)
        assert lm.config.model_type == family
        with torch.no_grad():
            out = lm(**ids, output_hidden_states=True)
        assert len(out.hidden_states) == lm.config.num_hidden_layers + 1
        assert torch.isfinite(out.hidden_states[-3]).all()
        widths[family] = lm.config.hidden_size
    assert widths["llama"] != widths["qwen2"]


def test_lm_training_lowered_heldout_perplexity(starter_micro) -> None:
    stages = starter_micro.summary["stages"]
    for family in ("llama", "qwen2"):
        m = stages[f"lm_{family}"]["metrics"]
        assert math.isfinite(m["heldout_perplexity"])
        # Even the micro preset's few steps must beat the untrained model (~uniform over the vocabulary).
        assert m["heldout_perplexity"] < 0.5 * m["heldout_perplexity_init"]
