"""Small random-weight transformers models for tests (no download): a LLaMA causal LM and a BERT classifier."""

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

LLAMA_VOCAB, BERT_VOCAB = 101, 50


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2 layers, hidden 64, MLP 96, 4 heads (2 KV heads), vocab 101; ``overrides`` go to LlamaConfig."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=LLAMA_VOCAB)
    return LlamaForCausalLM(LlamaConfig(**(fields | overrides))).eval()


def tiny_bert_classifier(seed: int = 0, **overrides) -> BertForSequenceClassification:
    """1 layer, hidden 32, 2 heads, MLP 48, vocab 50, 3 labels; ``overrides`` go to BertConfig."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                  vocab_size=BERT_VOCAB, num_labels=3)
    return BertForSequenceClassification(BertConfig(**(fields | overrides))).eval()


def tokens(vocab: int, shape=(2, 9), seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
