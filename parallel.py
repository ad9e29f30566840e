"""
Processes: one code path for `python x.py` (a group of one) and `torchrun --nproc_per_node=N x.py`. The process
group and rank-0 coordination; splitting work into rank shares and gathering it back; FSDP2 sharding of a model, and
loading a checkpoint so that each process reads only its own shards; embeddings and heads split by vocabulary
(Megatron-LM's vocabulary parallelism); and the distillation teacher split by heads (its tensor parallelism).
"""
import ctypes
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from tqdm import tqdm

from data import HELD_OUT, TEXT_KEY, corpus_files, holds_out, tokenize_corpus
from hf import open_safetensors, read_rows, safetensors_header, stored_name
from model import ChunkedLoss, Transformer, read_checkpoint, softcap, to_dtype

# Peak dense bf16 tensor FLOP/s, for MFU (Chowdhery et al. 2022): achieved model FLOP/s over this.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def by_gpu_name(table, device):
    """The value of a {GPU name substring: value} table for this device; None on a CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in table.items() if k in name), None)


def compute_dtype(name, device):
    """--dtype, by default bf16 on GPU and fp32 on CPU (where bf16 matmuls are slow)."""
    return to_dtype(name or ("bfloat16" if device.type == "cuda" else "float32"))


# -----------------------------------------------------------------------------
# The process group


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; plain `python train.py` is a group of one. One code path."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if int(os.environ["WORLD_SIZE"]) > 1:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
            unmap_gathered_weights()
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


# glibc serves an allocation from its heap below the "mmap threshold", which grows with every large block freed
# (up to 32 MB). FSDP2 gathers each block's weights for every forward pass and frees them after: on a CPU those
# tensors (a Qwen-style MLP matrix is ~27 MB) then land in the heap, which keeps the freed pages, and a process that
# decodes through a sharded model grows by a model's worth of gathered weights. A fixed threshold maps each larger
# tensor on its own and unmaps it when freed. (The GPU's caching allocator reuses its blocks; nothing to do there.)
MMAP_THRESHOLD = 4 * 2**20


def unmap_gathered_weights():
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD: fixed from here on
    except (OSError, AttributeError):  # not glibc
        pass


def log(*args):
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def on_rank0(fn):
    """fn() on rank 0 while the other processes wait; returns its result on rank 0 (None elsewhere). A user error
    there stops every process with rank 0's message, instead of leaving the others waiting forever at their next
    collective."""
    error = result = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except SystemExit as e:
            error = str(e.code)
        except (ValueError, OSError) as e:  # (a missing, unreadable or full place is the user's to fix)
            error = f"error: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SystemExit(box[0] if dist.get_rank() == 0 else 1)
    return result


def launch(run, args):
    """Run a training command (train.py, sft.py, distill.py) and leave the process group cleanly: after a
    successful run every process waits for the others before the group is destroyed (one process tearing its
    gloo connections down while another still holds them has aborted the latter at exit)."""
    try:
        result = run(args)
        if dist.is_initialized():
            dist.barrier()
        return result
    except FloatingPointError as e:  # a diverged run: say which step and which checkpoint is good, no traceback
        raise SystemExit(str(e)) from None
    except (ValueError, OSError, KeyError) as e:  # a user's file, flag or disk, named in the message
        message = e.args[0] if isinstance(e, KeyError) else str(e)
        raise SystemExit(f"error: {message}" if not dist.is_initialized() or dist.get_rank() == 0 else 1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def tokenize_once(tokenizer, data_root, domain, split, text_key=TEXT_KEY):
    """The token stream of data/<domain>/<split> (rows' text under text_key): rank 0 tokenises it (or finds it
    cached) while the others wait, then every process reads the cache. (Two separate runs tokenising one corpus at
    once are safe too: each writes its own temporary file and renames it into place.)"""
    def tokenize():  # (a domain without val/: training never sees the documents its val split holds out)
        return tokenize_corpus(tokenizer, data_root, domain, split, text_key=text_key, skip_held_out=True)
    tokens = on_rank0(tokenize)
    if tokens is None:  # the other processes, once rank 0 has written the cache
        tokens = tokenize()
    bos, eos = tokenizer.document_ids()
    framing = " ".join(repr(tokenizer.decode([i])) for i in (bos, eos) if i is not None)
    n_files = len(corpus_files(data_root, domain, split))
    if split == "val" and holds_out(data_root, domain):  # (a count of eos: one per document)
        log(f"{os.path.join(data_root, domain, 'val')}/: none, so val is {int(np.count_nonzero(tokens == eos))} "
            f"document(s) held out of train/'s {n_files} files (1 in {HELD_OUT} by content hash; train skips them), "
            f"{len(tokens):,} tokens")
    else:
        log(f"{os.path.join(data_root, domain, split)}/: {n_files} files, {len(tokens):,} tokens (documents framed "
            f"by {framing})")
    return tokens


def rank_share(items, rank, world):
    """This process's share of a list: contiguous blocks of ceil(n / world) items, in rank order (the last ones may
    be shorter or empty), so gathering the shares in rank order gives back the list. The one way work is split
    across processes: batches, val windows, prompts to sample."""
    per_rank = -(-len(items) // world)
    return items[rank * per_rank:(rank + 1) * per_rank]


def gather(items):
    """Every process's list, concatenated in rank order, on every process (the inverse of rank_share)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def all_sum(values, device):
    """Sum a list of floats over processes (a no-op in one process without a process group, as in eval.py)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def micro_batches_of(batch, micro_batch_size, rank, world):
    """This process's micro-batches out of the global batch (its rank_share of the rows)."""
    mine = rank_share(batch, rank, world)
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def check_batch_sizes(args, world):
    if args.batch_size % (args.micro_batch_size * world):
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} processes")


# -----------------------------------------------------------------------------
# FSDP2: a model sharded over the processes


def shard_model(model, device, dtype, compile=False):
    """FSDP2 (torchtitan's recipe): fully_shard each block, then the root, so each block's parameters are gathered
    just before it runs and freed after. Weights stay fp32; with bf16 the forward/backward runs in bf16 and
    gradients are reduced in fp32. Gradients are SUMMED over processes (divide factor 1): the loss is already
    normalised by the global number of trained tokens, so averaging would divide twice (and over gloo FSDP2 has been
    reported to sum anyway, pytorch issue 162338: summing on purpose makes both backends agree).

    With several processes the embedding and the head are split by vocabulary instead (vocab_parallel) and never
    gathered: gathered, they and their gradient would be held whole by every process (1.1 GB per process for a
    152k x 896 table in fp32), the part of a step that did not shrink with more processes."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else \
        MixedPrecisionPolicy()
    if not model.lm_head.weight.is_meta:  # (a model on the meta device is materialised after sharding)
        model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.model.layers:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    tables = vocab_parallel(model, mesh, dtype) if dist.get_world_size() > 1 else set()
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=tables)
    register_forward_methods(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def register_forward_methods(model):
    """Transformer.hidden and .loss run the network without forward: tell FSDP2 they are forward passes too, so
    that the root's parameters (embedding, final norm, head) are gathered for them and freed after."""
    for name in ("hidden", "loss"):
        register_fsdp_forward_method(model, name)


def load_sharded(path, device, dtype, compile=False):
    """An HF checkpoint as a sharded FSDP2 model of fp32 weights, each process reading only its own shards: the
    model is built on the meta device (no memory), sharded, given storage for this process's shards alone, and
    filled from the safetensors files slice by slice (load_rows). Memory per process while loading:
    its 1 / world of the model plus one slice, never the whole model (torchtitan loads the same way). The config's
    dtype stays the one the checkpoint is stored in, which the export writes back."""
    config, _ = read_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(config)
    model = shard_model(model, device, dtype, compile=compile)
    model.to_empty(device=device)
    load_rows(model, path, owned_rows)
    return model


def load_rows(model, path, owned):
    """Fill the model's parameters from the HF directory at path, each with only the part it holds: owned(p) ->
    (the tensor p keeps, its first row in the full tensor). A process of a sharded model reads its own rows of each
    tensor from the files (hf.read_rows: those bytes alone), so loading needs its share of the model, not the
    whole. A weight split by columns (p.columns, a tensor-parallel teacher's) reads its rows whole, one tensor at a
    time, and keeps its columns. Parameters keep their dtype (the stored one is converted a slice at a time)."""
    config, files = read_checkpoint(path)
    where = {key: file for file, keys in files.items() for key in keys}
    headers = {file: safetensors_header(file) for file in files}
    for name, p in model.named_parameters():  # a tied lm_head is the embedding: read once
        local, start = owned(p)
        file, key, columns = where[name], stored_name(config.model_type, name), getattr(p, "columns", None)
        into = local if columns is None else torch.empty(len(local), headers[file][0][key]["shape"][1],
                                                         dtype=local.dtype, device=local.device)
        with torch.no_grad():
            read_rows(file, headers[file], key, start, start + len(local), into=into)
            if columns is not None:
                local.copy_(into[:, columns[0]:columns[1]])
    model.reset_rope()


def chunk_rows(n):
    """This process's rows [start, stop) of n, as FSDP2 shards dim 0 (torch.chunk's split): chunks of ceil(n / world)
    in rank order, the last ones shorter or empty. Every table split by vocabulary is split so too."""
    per_rank = -(-n // dist.get_world_size())
    start = min(dist.get_rank() * per_rank, n)
    return start, min(start + per_rank, n)


def owned_rows(p):
    """The part of parameter p this process holds, and its first row in the full tensor: FSDP2's (and
    vocab_parallel's) DTensors hold their chunk_rows; a tensor split outside FSDP (a sharded teacher's vocabulary,
    heads and hidden units) says where its rows start; anything else is whole."""
    if isinstance(p, DTensor):
        return p.to_local(), chunk_rows(p.shape[0])[0]
    if getattr(p, "mapped", False):  # (a tensor mapped from its file already holds it: nothing to read)
        return p.data[:0], 0
    return p.data, getattr(p, "first_row", 0)


@torch.no_grad()
def full_tensor(t):
    """A parameter's whole value from its shards (a collective: every process must call it). Rows split as
    torch.chunk splits them (FSDP2's and vocab_parallel's shards) arrive by one broadcast per process straight into
    their rows of the result: DTensor.full_tensor's all-gather holds a second copy of the whole tensor over gloo."""
    if not isinstance(t, DTensor):
        return t
    if tuple(t.placements) != (Shard(0),):
        return t.full_tensor()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    for rank, rows in enumerate(out.chunk(dist.get_world_size())):
        if rank == dist.get_rank():
            rows.copy_(t.to_local())
        dist.broadcast(rows, src=rank)
    return out


# -----------------------------------------------------------------------------
# Embedding and head split by vocabulary (Megatron-LM's vocabulary parallelism)
#
# The largest tensors (vocabulary x dim) are split by rows over the processes and never gathered: the teacher's
# (load_teacher) and, in training, the student's or the adapted model's (vocab_parallel). Activations cross
# between processes instead: a token's embedding, and a chunk's logits and their gradient.


# (torch 2.13 renamed these two; the old names still work there, with a warning)
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


# Three collectives with their gradients (the trained model's vocabulary split goes through them in backward):
# Gather and ReduceScatter are each other's transpose and AllToAll its own, so each one's backward is its partner.


class Gather(torch.autograd.Function):
    """x [n, ...] -> every process's x, [world, n, ...]; backward: each process's part of the summed gradient."""

    @staticmethod
    def forward(ctx, x):
        out = x.new_empty(dist.get_world_size(), *x.shape)
        all_gather_single(out, x.contiguous()[None])
        return out

    @staticmethod
    def backward(ctx, g):
        return ReduceScatter.apply(g)


class ReduceScatter(torch.autograd.Function):
    """[world, n, ...] partial values -> the sum over processes of their r-th part, on process r; backward: Gather."""

    @staticmethod
    def forward(ctx, x):
        out = x.new_empty(x.shape[1:])
        reduce_scatter_single(out, x.contiguous().flatten(0, 1))
        return out

    @staticmethod
    def backward(ctx, g):
        return Gather.apply(g)


class AllToAll(torch.autograd.Function):
    """[world, ...] -> [world, ...], part r of the result being process r's part for this process (its own
    inverse, and so its own backward)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()  # (first: empty_like keeps a permuted tensor's strides, all_to_all writes densely)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x)
        return out

    @staticmethod
    def backward(ctx, g):
        return AllToAll.apply(g)


def gather_rows(x):
    """Every process's x [n, ...] (n may differ), padded to the longest: ([world, n_max, ...], this process's n)."""
    n = torch.tensor([len(x)], device=x.device)
    sizes = torch.empty(dist.get_world_size(), dtype=n.dtype, device=x.device)
    all_gather_single(sizes, n)
    longest = int(sizes.max())
    return Gather.apply(F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - len(x)))), len(x)


def local(weight, dtype=None):
    """This process's rows of a table split by vocabulary (a DTensor's local shard, differentiable), in dtype (by
    default the weight's)."""
    return (weight.to_local() if isinstance(weight, DTensor) else weight).to(dtype or weight.dtype)


class VocabShardedEmbedding(nn.Module):
    """Rows [first_row, first_row + n) of an embedding table: this process looks up the tokens in its rows, for
    every process's tokens (zeros for the others), and each process receives the sum over the slices of its own
    tokens' lookups: every token's row. same_rows (a tensor-parallel teacher's: every process looks up the same
    tokens): the sum over the slices, all-reduced, without gathering. The weight is a plain tensor (the teacher's)
    or a DTensor of the whole table (the trained model's, vocab_parallel); dtype: the compute dtype."""

    def __init__(self, weight, first_row, same_rows=False, dtype=None):
        super().__init__()
        self.weight, self.first_row, self.same_rows, self.dtype = weight, first_row, same_rows, dtype

    def lookup(self, ids):
        """The rows of the tokens in this slice, zeros for the others."""
        rows = local(self.weight, self.dtype)
        i = ids - self.first_row
        mine = (i >= 0) & (i < len(rows))
        return F.embedding(i.clamp(0, max(len(rows) - 1, 0)), rows) * mine[..., None]

    def forward(self, idx):
        if dist.get_world_size() == 1:
            return F.embedding(idx, self.weight)
        if self.same_rows:
            x = self.lookup(idx)
            dist.all_reduce(x)
            return x
        ids, n = gather_rows(idx.flatten())
        return ReduceScatter.apply(self.lookup(ids))[:n].view(*idx.shape, -1)


class VocabShardedHead(nn.Module):
    """The output layer's rows for this process's slice of the vocabulary: the logits of the slice for every
    process's hidden states, exchanged (all-to-all) so that each process gets its own rows' logits over the whole
    vocabulary; soft-capped as model.Head caps them (Gemma's final_logit_softcapping). The weight as
    VocabShardedEmbedding's. For the training loss (model.ChunkedLoss) the chunk's gradient goes back the same way:
    each process's slice of it is that of its rows of the vocabulary, whose gradient it keeps, for every process's
    positions; the gradient of the positions' hidden states is summed over the slices."""

    def __init__(self, weight, first_row, vocab_size, cap=None, dtype=None):
        super().__init__()
        self.weight, self.first_row, self.vocab_size, self.cap, self.dtype = weight, first_row, vocab_size, cap, dtype

    def forward(self, h):
        weight = local(self.weight, self.dtype)
        if dist.get_world_size() == 1:
            return softcap(F.linear(h, weight), self.cap)
        logits = self.chunk_logits(h.reshape(-1, h.shape[-1]), weight)
        return softcap(logits.view(*h.shape[:-1], self.vocab_size), self.cap)

    def width(self):
        return -(-self.vocab_size // dist.get_world_size())  # every slice padded to the same width (all_to_all)

    def chunk_logits(self, h, weight):
        """Logits [n, vocabulary] of this process's hidden states h [n, dim], from every process's slice."""
        hidden, n = gather_rows(h)
        mine = F.pad(F.linear(hidden, weight), (0, self.width() - len(weight)))  # [world, n_max, width]
        parts = AllToAll.apply(mine)  # parts[r]: slice r's logits of this process's rows
        return parts.permute(1, 0, 2).flatten(1)[:n, :self.vocab_size]

    def loss(self, h, loss_fn, chunks, vocab=None):
        assert vocab is None  # (a reduced head is for one process: distill.distilled)
        return ChunkedLoss.apply(h, local(self.weight, self.dtype), loss_fn, chunks, self, torch.is_grad_enabled())

    def chunk_backward(self, g, h, weight, grad_w):
        """model.Head.chunk_backward over the split: g [n, vocabulary] of this process's rows goes to the slices'
        processes; this one adds its slice's dW for every process's rows, and returns its rows' dh, summed."""
        world, width = dist.get_world_size(), self.width()
        hidden, n = gather_rows(h)
        g = F.pad(g, (0, world * width - self.vocab_size, 0, hidden.shape[1] - n)).view(-1, world, width)
        mine = AllToAll.apply(g.permute(1, 0, 2))[..., :len(weight)]  # [world, n_max, this slice's width]
        grad_w.addmm_(mine.flatten(0, 1).T.float(), hidden.flatten(0, 1).float())
        return ReduceScatter.apply(mine @ weight)[:n]


def vocab_parallel(model, mesh, dtype):
    """The trained model's embedding and head split by vocabulary over the processes (Megatron-LM's vocabulary
    parallelism), each process holding its rows as a DTensor sharded as FSDP2 shards (torch.chunk's split, so
    checkpoints, the export and the optimizer treat them as the other weights): returns them, for fully_shard to
    leave alone."""
    V = model.config.vocab_size
    start, stop = chunk_rows(V)
    tables = {}

    def split_rows(weight):  # (a tied head is the embedding: split once)
        if weight not in tables:
            mine = weight.detach()[start:stop].clone()
            tables[weight] = nn.Parameter(DTensor.from_local(mine, mesh, [Shard(0)], run_check=False,
                                                             shape=weight.shape, stride=weight.stride()))
        return tables[weight]
    embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
    model.model.embed_tokens = VocabShardedEmbedding(split_rows(embedding), start, dtype=dtype)
    model.lm_head = VocabShardedHead(split_rows(head), start, V, model.config.logit_softcap, dtype=dtype)
    return set(tables.values())


# -----------------------------------------------------------------------------
# The sharded teacher (distill.py)
#
# The teacher only runs forward, and under torchrun it is split over the processes like the student, so that its
# memory per process is divided by their number. The embedding and the output layer are split by vocabulary (above),
# the blocks by heads and hidden units (Megatron-LM's tensor parallelism, Shoeybi et al. 2019): attention by k/v
# heads, each with its query heads (q, k, v keep their rows, o_proj its columns), the MLP by hidden units (gate and up
# keep their rows, down_proj its columns); each process's o_proj and down_proj give a partial sum of the block's
# output, which an all-reduce completes; the norms are whole everywhere. Nothing is ever gathered but activations, so
# decoding (a pass per token: the teacher's samples, the held-out paths) moves a few KB per block where FSDP would
# move every block's weights for every token (3.2 s a pass for a 0.72B teacher on 2 CPU processes over gloo). Every
# process runs every row: decoding is given the same rows on every process (distill.py generates them so), and the
# training batches' teacher pass first gathers every process's rows (TensorParallelTeacher.hidden). A teacher with
# fewer k/v heads than processes keeps FSDP2 on its blocks: each gathered just before it runs and freed after.


def split(n, rank, world):
    """This process's contiguous part [start, stop) of n things shared out as evenly as possible."""
    return n * rank // world, n * (rank + 1) // world


def cut(linear, rows=None, columns=None):
    """nn.Linear `linear` (on the meta device) keeping rows [a, b) of its outputs, or columns [a, b) of its inputs;
    the new layer says which (first_row, columns) for load_rows."""
    a, b = rows or columns
    assert rows or linear.bias is None  # (a bias after a partial sum would be added once per process)
    new = type(linear)(linear.in_features if rows else b - a, b - a if rows else linear.out_features,
                       bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
    new.first_row, new.columns = (a if rows else 0), columns
    return new


def all_reduce_output(module, args, output):
    """A forward hook completing a partial sum: every process's o_proj (or down_proj) over its heads (units)."""
    dist.all_reduce(output)
    return output


def tensor_parallel_block(block, rank, world):
    """Cut one block (on the meta device) to this process's k/v heads, with their query heads, and hidden units."""
    attn, mlp = block.self_attn, block.mlp
    hd, group = attn.head_dim, attn.n_heads // attn.n_kv_heads
    kv0, kv1 = split(attn.n_kv_heads, rank, world)
    attn.q_proj = cut(attn.q_proj, rows=(kv0 * group * hd, kv1 * group * hd))
    attn.k_proj = cut(attn.k_proj, rows=(kv0 * hd, kv1 * hd))
    attn.v_proj = cut(attn.v_proj, rows=(kv0 * hd, kv1 * hd))
    attn.o_proj = cut(attn.o_proj, columns=(kv0 * group * hd, kv1 * group * hd))
    attn.n_heads, attn.n_kv_heads = (kv1 - kv0) * group, kv1 - kv0
    h0, h1 = split(mlp.gate_proj.out_features, rank, world)
    mlp.gate_proj, mlp.up_proj = cut(mlp.gate_proj, rows=(h0, h1)), cut(mlp.up_proj, rows=(h0, h1))
    mlp.down_proj = cut(mlp.down_proj, columns=(h0, h1))
    for partial in (attn.o_proj, mlp.down_proj):
        partial.register_forward_hook(all_reduce_output)


class TensorParallelTeacher(Transformer):
    """A teacher whose blocks are tensor_parallel_block's: every process runs every row. Decoding (forward with the
    KV cache) must be given the same rows on every process; hidden, the training batches' teacher pass, gathers
    every process's rows first and gives each process its own back (on the KV cache, a prefill's, it does not)."""

    def hidden(self, idx, input_pos=None, unpadded=None):
        if input_pos is not None:
            return super().hidden(idx, input_pos, unpadded)
        ids, n = gather_rows(idx)
        h = self._trunk(ids.flatten(0, 1))
        return h.view(*ids.shape[:2], *h.shape[1:])[dist.get_rank(), :n]


def tensor_parallel(config, world):
    """Whether a teacher of this config is split by heads over `world` processes: each needs a k/v head."""
    return world > 1 and config.n_kv_heads >= world


def load_teacher(path, device, dtype, replicate=False):
    """The teacher in dtype, for inference, split as described above; each process reads only its own part of
    the checkpoint (load_sharded's way: built on the meta device, split, then filled slice by slice). In one
    process, or with --replicate-teacher, the plain model: no collectives."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1 or replicate:
        return Transformer.from_pretrained(path, device, dtype).eval().requires_grad_(False)
    config, files = read_checkpoint(path)
    heads = tensor_parallel(config, world)
    # An untied embedding is only looked up: with the blocks split by heads every process looks up the same tokens,
    # so on a CPU each can map the stored table from its file (safetensors' get_tensor) instead of holding a slice of
    # it. Only the pages of the rows looked up become resident, as in one process, and no lookup needs a collective.
    mapped = heads and not config.tie_embeddings and device.type == "cpu" and to_dtype(config.dtype) == dtype
    with torch.device("meta"):
        teacher = (TensorParallelTeacher if heads else Transformer)(config).to(dtype)
        first, stop = chunk_rows(config.vocab_size)
        shard = [nn.Parameter(torch.empty(stop - first, config.dim, dtype=dtype), requires_grad=False)
                 for _ in range(1 if config.tie_embeddings else 2)]
    teacher.model.embed_tokens = VocabShardedEmbedding(shard[0], first, same_rows=heads)
    teacher.lm_head = VocabShardedHead(shard[-1], first, config.vocab_size, config.logit_softcap)
    for block in teacher.model.layers:
        if heads:
            tensor_parallel_block(block, rank, world)
        else:
            fully_shard(block, reshard_after_forward=True)
    if not heads:
        fully_shard(teacher, reshard_after_forward=True, ignored_params=set(shard))  # (the final norm)
        register_forward_methods(teacher)
    teacher.to_empty(device=device)  # (new tensors: tie them again, and say which rows or columns each holds)
    if config.tie_embeddings:
        teacher.lm_head.weight = teacher.model.embed_tokens.weight
    if mapped:  # (the slice made by to_empty was never written: no memory of its own yet)
        name = "model.embed_tokens.weight"
        with open_safetensors(next(f for f, keys in files.items() if name in keys), device) as f:
            teacher.model.embed_tokens = nn.Embedding.from_pretrained(f.get_tensor(stored_name(config.model_type,
                                                                                               name)))
    for m in teacher.modules():
        for p in m.parameters(recurse=False):
            if not isinstance(p, DTensor):
                p.first_row, p.columns = getattr(m, "first_row", 0), getattr(m, "columns", None)
    teacher.model.embed_tokens.weight.mapped = mapped
    load_rows(teacher, path, owned_rows)
    return teacher.eval().requires_grad_(False)
