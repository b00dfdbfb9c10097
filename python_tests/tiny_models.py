"""The shared test helpers: small random-weight transformers models (no download: a LLaMA causal LM and a BERT
classifier) and token ids for them, random adapter weights, the tensors autograd saves for backward, model
snapshots for "left untouched" checks, torch's intra-op thread count set for a block, and the tolerance rule of
the kernel tests."""

import contextlib

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


def randomize(model, seed: int = 1, scale: float = 0.2, select=None, replace: bool = False, mask=None) -> None:
    """Random adapter weights, so that zero-initialised LoRA B / adapter ups cannot make a test vacuous.

    For each selected parameter, in ``model.named_parameters()`` order, draws ``randn(p.shape) * scale`` (fp32) from
    one ``torch.Generator().manual_seed(seed)`` and adds it to the parameter or, with ``replace``, copies it in.
    ``select(name)`` picks parameters by name (default: every parameter with requires_grad). ``mask(name)`` may
    return a tensor the noise is multiplied by (e.g. a pruning mask, so that pruned weights stay zero) or None."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (p.requires_grad if select is None else select(name)):
                continue
            noise = torch.randn(p.shape, generator=g) * scale
            keep = None if mask is None else mask(name)
            if keep is not None:
                noise *= keep
            if replace:
                p.copy_(noise)
            else:
                p.add_(noise)


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count is n inside the block and restored after it, also when the block raises."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_thread_counts(fn, counts=(1, 2)) -> list:
    """[fn() run with each intra-op thread count of `counts`]: for results that must not depend on it."""
    results = []
    for n in counts:
        with num_threads(n):
            results.append(fn())
    return results


def saved_tensors(fn):
    """``(fn(), [every tensor autograd saved for backward while fn ran, in order])``; the list holds the saved
    tensors themselves (same storage: compare ``data_ptr()``s), duplicates included."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _modules(model):
    """Per module: name, type, forward (pre-)hook ids and ``peft_kernels*`` attributes (what apply attaches)."""
    return [(name, type(m), list(m._forward_pre_hooks), list(m._forward_hooks),
             [a for a in dir(m) if a.startswith("peft_kernels")]) for name, m in model.named_modules()]


def snapshot(model) -> dict:
    """What ``assert_untouched`` compares: modules (names, types, forward hooks, ``peft_kernels*`` attributes), a
    copy of the state dict and the parameters' requires_grad flags."""
    return dict(modules=_modules(model), state={k: v.detach().clone() for k, v in model.state_dict().items()},
                flags=[(n, p.requires_grad) for n, p in model.named_parameters()])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_untouched(model, before: dict, what: str = "") -> None:
    """``model`` is as ``snapshot`` saw it: no module added, replaced, hooked or given a ``peft_kernels*`` attribute,
    the same state-dict keys with bit-for-bit the same values, the same requires_grad flags."""
    modules = _modules(model)
    assert modules == before["modules"], f"modules were added, replaced or hooked {what}".rstrip()
    state = model.state_dict()
    assert state.keys() == before["state"].keys(), f"state-dict keys changed {what}".rstrip()
    changed = [k for k, v in before["state"].items()
               if state[k].dtype != v.dtype or state[k].shape != v.shape or not torch.equal(_bits(state[k]), _bits(v))]
    assert not changed, f"values changed: {changed} {what}".rstrip()
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == before["flags"], \
        f"requires_grad flags changed {what}".rstrip()


def assert_tolerance(ours: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, atol: float, what: str,
                     same_dtype: bool = True) -> None:
    """The tolerance rule: ``ours`` is within twice the error of the reference run in the same low dtype (``low``),
    plus ``atol``, of the reference in float64 (``exact``). Shapes must match, and dtypes unless ``same_dtype`` is
    False (autocast: a gradient in its leaf's dtype against a reference run in bf16)."""
    assert ours.shape == exact.shape and (ours.dtype == low.dtype or not same_dtype), what
    err = (ours.double() - exact).abs().max().item() if ours.numel() else 0.0
    ref_err = (low.double() - exact).abs().max().item() if low.numel() else 0.0
    assert err <= 2 * ref_err + atol, f"{what}: error {err:.3g} vs reference-in-{low.dtype} {ref_err:.3g}"
