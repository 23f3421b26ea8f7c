"""GEMM layouts of a Linear (AxoNN's finding: the transposed layouts of one product differ by up
to several x on some GPUs): the equivalent formulations of its three GEMMs, the Linear autograd
computing each with the formulation a decision table chose for its shape, and which modules of a
model read a table (issue 16). Timing the formulations and keeping the decisions (the table, its
files, agreement across ranks) is kernels/gemm_tuning.py.

    attach(model, table)                                     # every Linear of `model` reads it
    y = linear(x, weight, bias, table)                       # x [.., K], weight [N, K] -> y [.., N]
    form = choose(table, role, m, n, k, dtype)               # Linears with their own autograd:
    y2 = forward(x2, weight, bias, form)                     #   the three GEMMs on 2-D operands,
    dx2 = input_grad(dy2, weight, form); dw = weight_grad(dy2, x2, form)  # each by its role's form

The three GEMMs of a Linear y = x W^T (x [M, K] tokens by inputs, W [N, K]), the roles:
    fwd  y  = x W^T    [M, N] = [M, K] [K, N]
    dx   dx = dy W     [M, K] = [M, N] [N, K]
    dw   dW = dy^T x   [N, K] = [N, M] [M, K]
A table's decision is keyed by the Linear's (role, m=M tokens, n=N out, k=K in, dtype).

Formulations. Each product C = A @ B is formed either as written ("plain") or as
C = (B^T @ A^T)^T ("swapped": the transposed product, its result read transposed), with each
operand handed over row-major (stride 1 along its last dim) or column-major (a transposed view
of a contiguous tensor), copying an operand whose layout differs. cuBLAS is column-major, so
torch computes a row-major P = F @ G as P^T = G^T F^T and calls gemm(op(G), op(F)) where a row-major
operand is op 'N' and a column-major one 'T'. A formulation is named by those two letters as
cuBLAS gets them, "s" first when swapped:
    plain   "XY": C = F @ G,          F = A laid out Y, G = B laid out X     (gemm m=N-side of C)
    swapped "sXY": C = (F @ G)^T,     F = B^T laid out Y, G = A^T laid out X (m and n exchanged)
so each role has 8 formulations: NN, NT, TN, TT, sNN, sNT, sTN, sTT. The one needing no copy
of its plain / swapped kind is what torch itself runs for F.linear and its autograd, the
`DEFAULT` (the untuned choice, bitwise F.linear's):
    fwd  "TN"   addmm(b, x, W.t())             (TN: AxoNN's forward layout)
    dx   "NN"   dy.mm(W)                       (NN)
    dw   "sNT"  x.t().mm(dy), read transposed  (NT; the weight's layout is restored by autograd)
The others cost an operand copy (included in their timing) or exchange m and n, and round
differently (fp32 sums in another order: equal within fp32 rounding, not bitwise). Results of
fwd and dx are contiguous (a swapped one is copied: included in the timing); a swapped dW is
returned transposed, as torch's own, and laid out as the weight by its consumer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from kernels.gemm_tuning import GemmTable

ROLES = ("fwd", "dx", "dw")
FORMS = ("NN", "NT", "TN", "TT", "sNN", "sNT", "sTN", "sTT")
DEFAULT = {"fwd": "TN", "dx": "NN", "dw": "sNT"}  # torch's own (F.linear and its autograd)


# ---- the formulations ----
def _laid(t: torch.Tensor, letter: str) -> torch.Tensor:
    """t [r, c] row-major ('N': stride 1 along c) or column-major ('T'), copied only if it is not."""
    if letter == "N":
        return t if t.stride(-1) == 1 else t.contiguous()
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def product(a: torch.Tensor, b: torch.Tensor, form: str, bias: Optional[torch.Tensor] = None,
            acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """C = a @ b [m, n] (a [m, k], b [k, n]) by formulation `form` (module docstring), plus `bias`
    [n] (bias + a @ b, as addmm) or accumulated into `acc` [m, n] in place (acc.addmm_)."""
    x_op, y_op = form[-2], form[-1]
    if form[0] != "s":  # C = F @ G
        f, g = _laid(a, y_op), _laid(b, x_op)
        if acc is not None:
            return acc.addmm_(f, g)
        return torch.addmm(bias, f, g) if bias is not None else f.mm(g)
    f, g = _laid(b.t(), y_op), _laid(a.t(), x_op)  # C^T = F @ G
    if acc is not None:
        acc.t().addmm_(f, g)
        return acc
    return (torch.addmm(bias[:, None], f, g) if bias is not None else f.mm(g)).t()


def forward(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], form: str) -> torch.Tensor:
    """y [M, N] = x2 [M, K] weight[N, K]^T (+ bias [N]), contiguous."""
    return product(x2, weight.t(), form, bias=bias).contiguous()


def input_grad(dy2: torch.Tensor, weight: torch.Tensor, form: str, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dx [M, K] = dy2 [M, N] weight [N, K] (added into `acc` [M, K] in place when given), contiguous."""
    return product(dy2, weight, form, acc=acc).contiguous()


def weight_grad(dy2: torch.Tensor, x2: torch.Tensor, form: str) -> torch.Tensor:
    """dW [N, K] = dy2 [M, N]^T x2 [M, K] (a swapped form returns it as a transposed view)."""
    return product(dy2.t(), x2, form)


def choose(table: Optional[GemmTable], role: str, m: int, n: int, k: int, dtype: torch.dtype) -> str:
    """The formulation of `role` for a Linear of shape (m tokens, n out, k in) computing in `dtype`."""
    return table.choice(role, m, n, k, dtype) if table is not None else DEFAULT[role]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on `t` computes in: autocast's where it is on (it leaves fp64 alone), else t's."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return t.dtype


# ---- the Linear ----
class LinearFn(torch.autograd.Function):
    """y = x W^T + b with the table's formulation for each of its three GEMMs; saves x and W."""

    @staticmethod
    def forward(ctx, x, weight, bias, table):
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        m, (n, k) = x2.shape[0], weight.shape

        def pick(role: str) -> str:
            return choose(table, role, m, n, k, x.dtype)

        ctx.save_for_backward(x, weight)
        ctx.forms, ctx.has_bias = (pick("dx"), pick("dw")), bias is not None
        return forward(x2, weight, bias, pick("fwd")).view(*x.shape[:-1], n)  # [.., N]

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # [M, N]
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = input_grad(dy2, weight, ctx.forms[0]).view(x.shape) if need_dx else None  # [.., K]
        dw = weight_grad(dy2, x.reshape(-1, x.shape[-1]), ctx.forms[1]) if need_dw else None  # [N, K]
        db = dy2.sum(0) if ctx.has_bias and need_db else None  # [N]
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           table: Optional[GemmTable] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (x [.., K], weight [N, K] -> [.., N]) by `table`'s formulations
    (None: F.linear itself, torch's own formulations without a Python autograd node). Under
    autocast the operands are cast to the autocast dtype first (as F.linear's are) and the
    Function runs without it."""
    if table is None:
        return F.linear(x, weight, bias)
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(dev)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(dev, enabled=False):
        return LinearFn.apply(x, weight, bias, table)


# ---- the model's Linears ----
def linears(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that compute with a table: those declaring a `gemm_table` attribute
    (axon.model.Linear, the tensor-parallel and deferred Linears)."""
    return [m for m in model.modules() if hasattr(m, "gemm_table")]


def attach(model: nn.Module, table: Optional[GemmTable]) -> None:
    """Every Linear of `model` computes with `table` (None: torch's formulations)."""
    for m in linears(model):
        m.gemm_table = table


def shapes(model: nn.Module, tokens: int) -> set[tuple[int, int, int]]:
    """(tokens, out, in) of every Linear GEMM of `model` at `tokens` rows per microbatch: the local
    [out, in] piece (`gemm_shape()` where a module's weight is stored flattened), else weight.shape."""
    out = set()
    for m in linears(model):
        n, k = m.gemm_shape() if hasattr(m, "gemm_shape") else m.weight.shape
        out.add((tokens, int(n), int(k)))
    return out
