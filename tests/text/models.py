"""Tiny random Hugging Face models (from_config, hidden 16, 2 layers) for the text tests."""

from __future__ import annotations

import logging

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 40
PAD = 0


def tiny(kind: str, attention: str = "eager", dtype: torch.dtype = torch.float32, seed: int = 0,
         layers: int = 2):
    """A tiny random model of ``kind`` ('bert', 'gpt2', 'llama', 'vit'), in eval mode."""
    torch.manual_seed(seed)
    common = {"attn_implementation": attention}
    if kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, num_labels=3,
                            pad_token_id=PAD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            **common)
        model = BertForSequenceClassification(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=48, n_embd=16, n_layer=layers, n_head=2,
                            bos_token_id=1, eos_token_id=2, pad_token_id=PAD, **common)
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=32, max_position_embeddings=48,
                             bos_token_id=1, eos_token_id=2, pad_token_id=PAD, **common)
        model = LlamaForCausalLM(config)
    elif kind == "vit":
        config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=32, num_labels=3, **common)
        model = ViTForImageClassification(config)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()
