"""
The training loss without the whole batch's logits: the head's logits and their loss one chunk of positions at a
time (ChunkedLoss), for model.Head.loss, and how many positions a chunk holds (loss_chunk_rows, also memory.py's).
"""

import torch


# Logits of one chunk of the loss: 2^23 fp32 values are 32 MB (55 positions of Qwen2.5's 151,936 tokens, 170 of
# SmolLM2's 49,152), against 5 GB for a 4 x 2048 micro-batch at once. Cross-entropy makes about three tensors of that
# size per chunk, a distillation loss about ten: its chunks have a third of the positions, and hold about as much.
# Larger chunks would not be much faster, only larger (and a chunk is per process, however many share the rest).
LOGITS_PER_CHUNK = 2**23
IGNORE = -100  # the target of an untrained position (F.cross_entropy's ignore_index)


def loss_chunk_rows(vocab_size, distillation=False):
    """Positions per chunk of the loss: at most LOGITS_PER_CHUNK logits (for distillation a third) exist at once."""
    return max(1, LOGITS_PER_CHUNK // vocab_size // (3 if distillation else 1))


class ChunkedLoss(torch.autograd.Function):
    """sum over chunks of loss_fn(h[rows] @ W^T, rows): the loss of the head's logits, one chunk of rows at a time.

    The logits are the largest tensor of a training step (micro-batch x seq-len x vocab, in fp32 for the loss), and
    autograd would keep all of them for backward. Here each chunk's gradient with respect to its logits is taken
    as soon as its loss is, and turned at once into the gradients of h and W (the chain rule through logits = h W^T:
    dh = g W, dW = g^T h), as Liger-Kernel's fused linear cross-entropy does. Backward only scales them by the
    incoming gradient: only one chunk of logits ever exists, and none is recomputed."""

    @staticmethod
    def forward(ctx, h, weight, loss_fn, chunks, head, grad=True):
        if not grad:  # no gradient wanted (validation, bits per byte): the chunks' losses, not dh's and dW's matmuls
            return sum((loss_fn(head.chunk_logits(h[rows], weight), rows).float() for rows in chunks),
                       torch.zeros((), device=h.device))
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # summed over chunks in fp32
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for rows in chunks:
            hc = h[rows]
            logits = head.chunk_logits(hc, weight).detach().requires_grad_()
            with torch.enable_grad():
                loss = loss_fn(logits, rows)
            g, = torch.autograd.grad(loss, logits)
            grad_h[rows] = head.chunk_backward(g, hc, weight, grad_w)
            total += loss.detach()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # (scaled in place: W's gradient is as large as W, and backward runs once)
        grad_h, grad_w = ctx.saved_tensors
        return grad_h.mul_(grad_total), grad_w.mul_(grad_total), None, None, None, None
