"""Run under torchrun by tests/test_scale.py: the memory-scaled paths against the plain ones they replace, on one
HF checkpoint. Every process checks; a mismatch raises (non-zero exit).

    torchrun --nproc_per_node=2 tests/sharded_worker.py <checkpoint> <teacher> <tokenizer dir> <out dir>

  - sharded loading (parallel.load_sharded, parallel.load_teacher) gives the weights Transformer.from_pretrained gives
    (the embedding and the head split by vocabulary), and the teacher split over the processes (by heads, or FSDP2
    with fewer k/v heads than processes) its logits and greedy decoding;
  - the chunked losses (DACP, SFT's masked one, distillation with the sharded teacher) give the losses and the
    gradients of the whole-logits formulas on the replicated models, and the DACP loss's gradients summed over the
    processes are the plain model's on the whole batch;
  - the streaming export writes the files safetensors' own save_file writes from the gathered state dict.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import export_hf  # noqa: E402
from distill import distillation_loss, distilled  # noqa: E402
from model import Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from parallel import full_tensor, load_sharded, load_teacher, setup_distributed, shard_model  # noqa: E402
from speculative import generate_batch  # noqa: E402
from train import next_token_loss  # noqa: E402

path, teacher_path, tokenizer_dir, out = sys.argv[1:5]
rank, world, device = setup_distributed()
fp32 = torch.float32


def close(a, b, what, rtol=1e-5):
    scale = max(b.abs().max().item(), 1e-6)
    err = (a - b).abs().max().item() / scale
    if not err <= rtol:
        raise AssertionError(f"{what}: relative difference {err:.3g}")


def grads(model):
    return {n: full_tensor(p.grad) for n, p in model.named_parameters()}


def same_loss_and_gradients(loss, ref, what):
    """Backward both losses; the losses and every gradient of `sharded` and `reference` must agree."""
    loss.backward()
    ref.backward()
    close(loss.detach(), ref.detach(), what)
    ref_grads = grads(reference)
    for name, g in grads(sharded).items():
        close(g, ref_grads[name], f"{what}: gradient of {name}")
    sharded.zero_grad()
    reference.zero_grad()


def batch(seed, rows=2 * world, width=13):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, plain.config.vocab_size, (rows, width), generator=g)


plain = Transformer.from_pretrained(path, dtype=fp32)

# Sharded loading: each process's shards are exactly the slices of the checkpoint's tensors
sharded = load_sharded(path, device, fp32)
for name, p in plain.named_parameters():
    if not torch.equal(full_tensor(dict(sharded.named_parameters())[name]).detach(), p.detach()):
        raise AssertionError(f"load_sharded: {name} differs from from_pretrained")
assert sharded.config.dtype == plain.config.dtype, (sharded.config.dtype, plain.config.dtype)
# with several processes the embedding and the head hold this process's rows of the vocabulary, FSDP2's split
for table in (sharded.model.embed_tokens.weight, sharded.lm_head.weight):
    rows = len(table.to_local()) if world > 1 else len(table)
    assert rows == len(plain.lm_head.weight.chunk(world)[rank]), (rows, world)

# The chunked DACP loss against cross-entropy on the whole logits; the same global batch split over the processes
reference = shard_model(Transformer.from_pretrained(path, dtype=fp32), device, fp32)
sharded.loss_chunk_rows = 5  # several chunks, the last one shorter
tokens = batch(1)
mine = tokens[rank * 2:(rank + 1) * 2]
x, y = mine[:, :-1], mine[:, 1:]

# ... whose gradients, summed over the processes (FSDP2's reduce-scatter; the embedding's and the head's rows, each
# process's own, split by vocabulary), are those of the plain model on the whole global batch
next_token_loss(sharded, torch.stack([x, y], 1)).backward()
F.cross_entropy(plain(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
for name, p in plain.named_parameters():
    close(full_tensor(dict(sharded.named_parameters())[name].grad), p.grad, f"summed gradient of {name}")
sharded.zero_grad()
plain.zero_grad()
same_loss_and_gradients(next_token_loss(sharded, torch.stack([x, y], 1)),
                        F.cross_entropy(reference(x).float().flatten(0, 1), y.flatten(), reduction="sum"),
                        "chunked DACP loss")

# SFT's masked loss: only the trained positions' logits are computed
labels = batch(2)
labels[:, :6] = -100
ids = batch(3)
mine = torch.stack([ids, labels], dim=1)[rank * 2:(rank + 1) * 2]
same_loss_and_gradients(next_token_loss(sharded, mine),
                        F.cross_entropy(reference(mine[:, 0]).float().flatten(0, 1), mine[:, 1].flatten(),
                                        ignore_index=-100, reduction="sum"),
                        "chunked SFT loss")

# The sharded teacher (another checkpoint of the same shape): its logits, and the distillation loss and gradients
teacher, plain_teacher = load_teacher(teacher_path, device, fp32), Transformer.from_pretrained(teacher_path, dtype=fp32)
with torch.no_grad():
    # (split by heads, a block's output is summed in another order: fp32 rounding, not 1e-6 as FSDP2's)
    close(teacher(ids), plain_teacher(ids), "sharded teacher logits", rtol=1e-5)
    # decoding with the KV cache, the same prompts on every process (as distill.py decodes): the plain teacher's
    prompts = [[1, 2, 3, 4], [5, 6]]
    if generate_batch(teacher, prompts, 6) != generate_batch(plain_teacher, prompts, 6):
        raise AssertionError(f"{type(teacher).__name__}: greedy decoding differs from the plain teacher's")
for kind, alpha in (("fkl", 0.0), ("tvd", 0.5)):
    loss = distilled(sharded, teacher, mine, kind, temperature=2.0, alpha=alpha)
    x, labels_ = mine[:, 0], mine[:, 1]
    mask = labels_ != -100
    with torch.no_grad():
        teacher_logits = plain_teacher(x)
    logits = reference(x)
    ref = distillation_loss(logits, teacher_logits, mask, kind, 2.0) * mask.sum()
    if alpha:
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels_.flatten(), ignore_index=-100, reduction="sum")
        ref = (1 - alpha) * ref + alpha * ce
    same_loss_and_gradients(loss, ref, f"distillation loss {kind}")

# The streaming export: the bytes safetensors writes from the whole state dict, in the checkpoint's own dtype
dtype = getattr(torch, plain.config.dtype)
export_hf(sharded, sharded.config, Tokenizer.from_pretrained(tokenizer_dir), out, dtype)
if rank == 0:
    state = {k: v.detach().to(dtype) for k, v in plain.state_dict().items()
             if not (k == "lm_head.weight" and plain.config.tie_embeddings)}
    save_file(state, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors"), "rb") as a, \
            open(os.path.join(out, "reference.safetensors"), "rb") as b:
        if a.read() != b.read():
            raise AssertionError("the streamed export differs from save_file's bytes")
dist.barrier()
print(f"rank {rank}: all equal (teacher: {type(teacher).__name__})")
dist.destroy_process_group()
