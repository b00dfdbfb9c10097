"""HF Trainer (transformers 5.x, CPU) training a tiny LLaMA that carries our LoRA, QLoRA or KronA modules, or
whose weights SparseAdamW updates on a sparse selection: a run
resumed from a mid-run checkpoint logs the same losses, bit for bit, as the uninterrupted run (dropout 0.1
included: Trainer restores torch's RNG state, from which our modules draw their Philox seeds).

Trainer checkpoints the whole model with save_pretrained (model.safetensors): parameters and our modules'
buffers (NF4 codes, absmax, nested_absmax, nested_code, offset). The resumed run starts from a model built
from another seed (other base weights, other NF4 bytes, other adapters), so its losses match only if every
one of those round-trips.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peft_kernels as pk

DATA = [{"input_ids": t, "labels": t} for t in torch.randint(0, 101, (24, 12), generator=torch.Generator().manual_seed(0))]


def make_model(kind, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    model = LlamaForCausalLM(config)
    if kind == "lora":
        return pk.apply(model, pk.LoRAConfig(r=4, dropout=0.1))
    if kind == "krona":
        return pk.apply(model, pk.KronAConfig(dropout=0.1))
    if kind == "sparse":  # every weight trainable, updated by SparseAdamW on 5% of its entries
        return model
    return pk.apply(model, pk.QLoRAConfig(r=4, dropout=0.1, quantize="all_linear", compute_dtype=torch.float32))


def sparse_optimizer(model):
    """SparseAdamW over random 5% masks with Child-Tuning_F's in-kernel gradient mask (p = 0.5): its state
    (indices, exp_avg, exp_avg_sq, step) must come back from Trainer's optimizer checkpoint."""
    masks = pk.sparse.random_mask(model, 0.05, seed=7)
    return pk.optim.SparseAdamW([(n, p, masks[n]) for n, p in model.named_parameters() if p.requires_grad], lr=1e-2,
                                child_p=0.5, seed=11)


def train(model, output_dir, resume=None, sparse=False):
    """6 steps of 4 sequences, a checkpoint every 3; returns the trainer and the loss logged at each step."""
    args = TrainingArguments(output_dir=str(output_dir), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, use_cpu=True, report_to=[], seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    optimizers = (sparse_optimizer(model), None) if sparse else (None, None)
    trainer = Trainer(model=model, args=args, train_dataset=DATA, optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("kind", ["lora", "qlora", "krona", "sparse"])
def test_resume_from_checkpoint_gives_the_same_losses(kind, tmp_path):
    sparse = kind == "sparse"
    trainer, losses = train(make_model(kind, seed=0), tmp_path, sparse=sparse)
    assert len(losses) == 6
    checkpoint = tmp_path / "checkpoint-3"
    saved = load_file(checkpoint / "model.safetensors")
    state = trainer.model.state_dict()
    assert saved.keys() == state.keys()  # every parameter and buffer of our modules is in the checkpoint
    if kind == "qlora":
        assert saved["model.layers.0.mlp.down_proj.codes"].dtype == torch.uint8
    resumed, resumed_losses = train(make_model(kind, seed=1), tmp_path / "resumed", resume=checkpoint, sparse=sparse)
    assert resumed_losses[3:] == losses[3:]  # steps 4-6, bit for bit
    final = resumed.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in state.items())
