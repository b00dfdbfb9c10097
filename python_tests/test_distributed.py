"""torch.distributed on the CPU (gloo, 2 processes on this machine): DDP and FSDP2 (``fully_shard``) training
of a tiny LLaMA carrying our LoRA or QLoRA modules follows the loss trajectory of one process on the same
global batch.

FSDP2 on CPU/gloo with torch 2.14 works for both: parameters (the frozen base weights, the adapters, norms,
embeddings) become sharded DTensors; NF4Linear's packed weight lives in buffers, which fully_shard does not
shard: each rank keeps a full copy (plain uint8/fp32 tensors), so the integer dtype never meets FSDP's
flattening (the "Cannot flatten integer dtype tensors" failure of packed weights stored as parameters) but
the 4-bit base is replicated, not sharded. With ``quant_storage=torch.float32`` the codes are frozen fp32
parameters instead, and fully_shard shards them: each rank holds half of the 4-bit base. The test asserts both
layouts.

One spawn of 2 processes runs every case (startup, not training, dominates: ~10 s on this machine).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import peft_kernels as pk
from tiny_models import num_threads

WORLD, STEPS = 2, 4
# lora-micro: LoRA under checkpoint_in_micro_batches, micro-batches of one sequence (the parameters' gradients come
# out of its checkpoint op once per step, summed over the micro-batches, where DDP and FSDP2 hook them).
KINDS = ["lora", "qlora", "qlora-sharded", "lora-micro"]
# The global batch, every step (so that the loss falls): 4 sequences of 12 tokens; rank k of 2 takes rows 2k,
# 2k+1. Every sequence has the same number of tokens, so the mean of the ranks' mean losses is the global one.
TOKENS = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(5))


def make_model(kind):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    model = LlamaForCausalLM(config)
    if kind == "lora":
        return pk.apply(model, pk.LoRAConfig(r=4, alpha=8))
    if kind == "lora-micro":
        return pk.checkpoint_in_micro_batches(pk.apply(model, pk.LoRAConfig(r=4, alpha=8)), micro_batch_tokens=12)
    storage = torch.float32 if kind == "qlora-sharded" else torch.uint8
    return pk.apply(model, pk.QLoRAConfig(r=4, alpha=8, quantize="all_linear", compute_dtype=torch.float32,
                                          quant_storage=storage))


def train(model, rank=0, world=1):
    """Global mean loss per step (AdamW on the trainable parameters, each rank on its slice of the batch)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    local = TOKENS.chunk(world)[rank]
    for _ in range(STEPS):
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def fsdp_layout(model):
    from torch.distributed.tensor import DTensor

    params = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
    buffers = {n: (type(b).__name__, b.dtype, tuple(b.shape)) for n, b in model.named_buffers() if ".codes" in n}
    codes = {n: (p.dtype, tuple(p.shape), tuple(p.to_local().shape)) for n, p in model.named_parameters()
             if ".codes" in n}
    return params, buffers, codes


def worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for kind in KINDS:
        results[f"ddp-{kind}"] = train(DistributedDataParallel(make_model(kind)), rank, WORLD)
        model = make_model(kind)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        results[f"fsdp-{kind}-layout"] = fsdp_layout(model)
        results[f"fsdp-{kind}"] = train(model, rank, WORLD)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    with num_threads(1):
        return {kind: train(make_model(kind)) for kind in KINDS}


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_loss_trajectory_as_one_process(distributed_results, single_process, kind, wrapper):
    """Both ranks see the same global loss, equal to one process's on the whole batch at every step (AdamW at
    lr 1e-2 lowers it by 0.12 over the 4 steps; only the summation order differs: 5e-7 measured at most)."""
    want = single_process[kind]
    for rank_results in distributed_results:
        got = rank_results[f"{wrapper}-{kind}"]
        assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
    assert want[-1] < want[0] - 0.1  # it trains


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_layout(distributed_results, kind):
    """Every parameter is a sharded DTensor; QLoRA's packed NF4 codes stay full uint8 buffers on each rank, or,
    with quant_storage=fp32, become parameters of which each rank holds half."""
    params, buffers, codes = distributed_results[0][f"fsdp-{kind}-layout"]
    assert params and all(params.values())
    if kind == "qlora-sharded":
        assert not buffers and len(codes) == 14
        # q_proj [64, 64]: 2048 bytes of codes = 512 fp32 elements, 256 on each of the 2 ranks.
        assert codes["model.layers.0.self_attn.q_proj.codes"] == (torch.float32, (512,), (256,))
    elif kind == "qlora":
        # 2 layers x 7 quantized Linear (q, k, v, o, gate, up, down); q_proj [64, 64]: 2048 bytes of codes.
        assert len(buffers) == 14
        assert buffers["model.layers.0.self_attn.q_proj.codes"] == ("Tensor", torch.uint8, (2048,))
    else:
        assert not buffers
