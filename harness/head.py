"""The output head: float32 logits at the scored positions only, and their log-sum-exp.

Known families (``HEAD_ONLY_FAMILIES``) run ``lm_head`` on the hidden states of scored
positions. On the CPU their NLLs are taken one vocabulary block at a time (``block_nlls``):
each block's float32 logits are made, picked and summed while in cache, and a chunk's logits are
never whole. Where the logits themselves are needed (``ppl compare --kl``), for offloaded heads
and on GPUs, a chunk's float32 logits are made whole (``head_logits``): a float32 CPU head writes
them transposed into one reused buffer (the workspace), a bf16/fp16 head writes float32 logits of
its exact products (``precision.low_precision_head``). The log-sum-exp is float32, without the
row max where that is safe (``log_sum_exp``).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from . import precision

# Model families whose causal-LM head is exactly ``lm_head(base_model(x).last_hidden_state)``,
# optionally followed by Gemma's final-logit soft-capping. Others take the plain logits path.
HEAD_ONLY_FAMILIES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
    "gemma3", "gemma3_text", "phi3", "olmo", "olmo2", "smollm3", "gpt2", "gpt_neox", "starcoder2",
}

def uses_head_path(model) -> bool:
    return getattr(model.config, "model_type", None) in HEAD_ONLY_FAMILIES and model.get_output_embeddings() is not None


@contextlib.contextmanager
def loaded_head(model):
    """The output head's weights in memory on its execution device while the block runs.

    A head offloaded by accelerate (``device_map`` with ``max_memory``/``offload_folder``) keeps
    its weight on the ``meta`` device and has its hook load it around each forward call; the
    scorer reads the weight itself, so it asks the hook to load it once for all the chunks of a
    batch and to offload it again afterwards. Other heads are left as they are.
    """
    head = model.get_output_embeddings()
    hook = getattr(head, "_hf_hook", None)
    if hook is None or head.weight.device.type != "meta":
        yield
        return
    hook.pre_forward(head)
    try:
        yield
    finally:
        hook.post_forward(head, None)


def head_logits(model, hidden: torch.Tensor, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Output head on some hidden states, as float32 logits [m, V] (soft-capped where the model does).

    The caller may overwrite the result. With a ``workspace`` (see ``head_workspace``) the logits
    are written into it, so they are valid only until the next call with the same workspace.

    A float32 head on the CPU is computed as ``W @ h.T`` into the workspace and returned as its
    transposed view: the big operand then is the matrix the BLAS kernel packs, and a reused
    buffer spares the kernel's page faults on half a gigabyte of fresh memory per chunk. On
    two CPU cores that is 1.2-1.5x the speed of ``h @ W.T`` into a new tensor (Gemma-3's 262k
    vocabulary, 256 to 1024 rows; ``benchmarks/head_kernel.py``). A bf16/fp16 ``nn.Linear`` head
    gives float32 logits of its exact products (``precision.low_precision_head``). Other heads
    run as the module is.
    """
    head = model.get_output_embeddings()
    weight = head.weight
    if type(head) is torch.nn.Linear and weight.dtype in precision.LOW:  # float32 output, never rounded
        out = workspace[: weight.shape[0] * _padded(hidden.shape[0])] if workspace is not None else None
        logits = precision.low_precision_head(head, hidden, out)
    elif workspace is not None and _cpu_linear_head(head) and hidden.dtype == weight.dtype:
        m, vocab = hidden.shape[0], weight.shape[0]
        ld = _padded(m)  # an odd row count made the kernel 1.4x slower (unaligned stores)
        hidden = hidden.to(weight.device)
        if ld != m:
            hidden = torch.cat([hidden, hidden.new_zeros(ld - m, hidden.shape[1])])
        logits_t = workspace[: vocab * ld].view(vocab, ld)
        torch.mm(weight, hidden.T, out=logits_t)
        if head.bias is not None:
            logits_t.add_(head.bias[:, None])
        logits = logits_t[:, :m].T
    else:
        logits = head(hidden.to(weight.device)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits.div_(cap).tanh_().mul_(cap)
    return logits


# float32 logits per vocabulary block of ``block_nlls`` (4 MiB): a block stays in the cores'
# caches between the matmul that writes it and the exp and sum that read it. The rows taken
# per call by default (``BLOCK_ROWS``): each call streams the head weight once.
BLOCK_FLOATS = 2**20
BLOCK_ROWS = 2048


def blocked_head(model) -> bool:
    """The model's NLLs are taken by ``block_nlls``: a known family's ``nn.Linear`` head with
    float32, bf16 or fp16 weights on the CPU (an offloaded head, whose weight waits on the meta
    device for its hook, takes the chunked path)."""
    return uses_head_path(model) and _workspace_head(model.get_output_embeddings())


def block_gemm(head, hidden: torch.Tensor, kind: str | None = None):
    """``gemm(v0, out)``: float32 logits of ``hidden`` for the head rows ``v0 : v0 + out.shape[1]``
    into ``out`` [m, n], and the kind chosen. bf16 weights and hidden states: ``mkl`` on AMX
    (``precision.mkl_bf16_gemm``), else ``bf16-products`` where bf16 is native (oneDNN's float32
    matmul in bf16 precision on the upcast operands, as ``precision.low_precision_head``). Any
    other head: ``float32`` on the upcast operands (products of bf16 or fp16 values are exact in
    float32; float32 hidden states are never rounded to bf16)."""
    w = head.weight
    bf16 = w.dtype == hidden.dtype == torch.bfloat16
    mkl = precision.mkl_bf16_gemm() if bf16 and w.stride(-1) == 1 else None  # MKL reads the weight's rows in place
    kind = kind or ("mkl" if mkl else "bf16-products" if bf16 and precision.cpu_bf16_flags() else "float32")
    if kind == "mkl":
        h = hidden.contiguous()
        return (lambda v0, out: mkl(h, w[v0 : v0 + out.shape[1]], out)), kind
    w32, h = precision.head_weight32(head), hidden.float()
    products = precision.bf16_products if kind == "bf16-products" else contextlib.nullcontext

    def gemm(v0, out):
        with products():
            return torch.mm(h, w32[v0 : v0 + out.shape[1]].T, out=out)

    return gemm, kind


def block_nlls(model, hidden: torch.Tensor, targets: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """-log softmax(head(hidden))[target] of each row, float32, one vocabulary block at a time.

    The float32 logits of a block of head rows are made (``_blocks``), the targets that fall in
    the block picked, and their exponentials summed into a float64 total per row while the block
    is still in cache: the [rows, vocabulary] logits are never made, and no pass over them goes
    to memory (``benchmarks/head_blocks.py``: for the bf16 SmolLM2 head on AMX, 1.6-1.9x the
    speed of the whole-chunk matmul and log-sum-exp). As ``log_sum_exp`` does, the exponentials
    are of the logits as they are; rows whose total is out of range (``SUM_LOW``) are computed
    again by blocks, their largest logit found first and subtracted.
    """
    head = model.get_output_embeddings()
    m, vocab = hidden.shape[0], head.weight.shape[0]
    gemm, _ = block_gemm(head, hidden, kind)
    block = _block_size(m, vocab)
    targets = targets.to(torch.int64)
    if m and not (0 <= int(targets.min()) and int(targets.max()) < vocab):
        raise ValueError(f"token ids {int(targets.min())}..{int(targets.max())} outside the head's {vocab} rows")
    order = targets.argsort()
    bounds = torch.searchsorted(targets[order], torch.arange(0, vocab + block, block)).tolist()
    total = torch.zeros(m, dtype=torch.float64)
    picked = torch.full((m,), torch.nan)  # every row's target lies in one block (checked above)
    for b, (v0, logits) in enumerate(_blocks(model, gemm, m, block)):
        rows = order[bounds[b] : bounds[b + 1]]
        picked[rows] = logits[rows, targets[rows] - v0]
        total += logits.exp_().sum(dim=1)
    lse = total.log().float()
    bad = ~((total >= SUM_LOW) & torch.isfinite(total))  # NaN is bad too: computed again, found again
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0]
        gemm, _ = block_gemm(head, hidden[rows], kind)
        top = torch.full((len(rows),), -torch.inf)
        for _, logits in _blocks(model, gemm, len(rows)):
            torch.maximum(top, logits.amax(dim=1), out=top)
        again = torch.zeros(len(rows), dtype=torch.float64)
        for _, logits in _blocks(model, gemm, len(rows)):
            again += logits.sub_(top[:, None]).exp_().sum(dim=1)
        lse[rows] = (again.log() + top).float()
    return lse.sub_(picked)


def _block_size(m: int, vocab: int) -> int:
    """Head rows per block for ``m`` hidden states: ``BLOCK_FLOATS`` logits, a multiple of 64 rows."""
    return min(vocab, max(64, BLOCK_FLOATS // max(m, 1) // 64 * 64))


def _blocks(model, gemm, m: int, block: int | None = None):
    """(first head row, float32 logits [m, n]) of each vocabulary block, bias added and soft-capped
    where the model does; every block in one reused buffer, valid until the next."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    block = block or _block_size(m, vocab)
    buf = torch.empty(m * block, dtype=torch.float32)
    cap = getattr(model.config, "final_logit_softcapping", None)
    for v0 in range(0, vocab, block):
        logits = gemm(v0, buf[: m * min(block, vocab - v0)].view(m, -1))
        if head.bias is not None:
            logits.add_(head.bias[v0 : v0 + logits.shape[1]].float())
        if cap:
            logits.div_(cap).tanh_().mul_(cap)
        yield v0, logits


def _padded(m: int, multiple: int = 16) -> int:
    return -(-m // multiple) * multiple


def _cpu_linear_head(head) -> bool:
    return type(head) is torch.nn.Linear and head.weight.device.type == "cpu" and head.weight.dtype == torch.float32


def _workspace_head(head) -> bool:
    """A CPU ``nn.Linear`` head whose logits go into a reused float32 buffer (float32 or bf16/fp16 weights)."""
    w = head.weight
    return type(head) is torch.nn.Linear and w.device.type == "cpu" and w.dtype in (torch.float32, *precision.LOW)


def head_workspace(model, step: int) -> torch.Tensor | None:
    """A flat float32 buffer for ``step`` positions of logits, or None where it brings nothing.

    Only a float32 CPU head uses one (on a GPU the caching allocator already reuses memory). One
    chunk's worth: the same bound as before, allocated once per call of ``logit_chunks`` rather
    than once per chunk.
    """
    head = model.get_output_embeddings()
    if not (uses_head_path(model) and _workspace_head(head)):
        return None
    return torch.empty(head.weight.shape[0] * _padded(step), dtype=torch.float32)


# A row's sum of exponentials, taken without subtracting the row's largest logit first, is
# trusted when it lies in [SUM_LOW, inf): no term overflowed, and terms that fell below float32's
# normal range weigh < 1e-12 of it. That holds for any row whose largest logit lies between about
# -46 and +76; other rows are computed again with the largest logit subtracted.
SUM_LOW = 1e-20


def chunk_nll(logits: torch.Tensor, targets: torch.Tensor, again=None) -> torch.Tensor:
    """-log softmax(logits)[target] = logsumexp(logits) - logits[target], row by row, float32.

    Computed in place (``logits`` is consumed): the only [m, V] tensor is the one the head made,
    where ``torch.logsumexp`` or ``log_softmax`` would each allocate another one or two.
    """
    picked = logits.gather(1, targets[:, None])[:, 0]
    return log_sum_exp(logits, again, in_place=True).sub_(picked)


def log_sum_exp(logits: torch.Tensor, again=None, in_place: bool = False) -> torch.Tensor:
    """log sum_v exp(logits[:, v]), row by row, float32 (``in_place`` consumes ``logits``).

    With ``again(rows) -> logits of those rows`` (the head path), the exponentials are taken of
    the logits as they are: one pass over the [m, V] floats instead of three (max, subtract, exp),
    and each term rounded once, not after a subtraction. Rows whose sum is out of range
    (``SUM_LOW``) are computed again, with their largest logit subtracted. Without it, always so.
    """
    if again is None:
        return _shifted_lse(logits if in_place else logits.clone())
    total = (logits.exp_() if in_place else logits.exp()).sum(dim=1)
    lse = total.log()
    bad = ~((total >= SUM_LOW) & torch.isfinite(total))  # NaN is bad too: computed again, found again
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0]
        lse[rows] = _shifted_lse(again(rows))
    return lse


def _shifted_lse(logits: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of each row with the row's largest logit subtracted first (consumes ``logits``)."""
    top = logits.amax(dim=1, keepdim=True)
    return logits.sub_(top).exp_().sum(dim=1).log_().add_(top[:, 0])


# One head workspace per model (float32 CPU heads only), kept between batches: fresh memory for
# every batch would cost the page faults the workspace is there to save. Weakly keyed, so it goes
# with the model. ``token_nlls`` is its only user, and it runs one chunk at a time.
_WORKSPACES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


def cached_workspace(model, step: int) -> torch.Tensor | None:
    head = model.get_output_embeddings()
    ws = _WORKSPACES.get(head)
    if ws is None or ws.numel() < head.weight.shape[0] * _padded(step):
        _WORKSPACES.pop(head, None)  # the old one goes before the new one is made
        ws = head_workspace(model, step)
        if ws is not None:
            _WORKSPACES[head] = ws
    return ws


def release_workspace(model) -> None:
    """Free the model's cached head workspace (it is made again on the next ``token_nlls``)."""
    _WORKSPACES.pop(model.get_output_embeddings(), None)
