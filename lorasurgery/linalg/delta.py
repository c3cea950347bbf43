"""Merge kernels: W' = W + Σ wᵢ·ΔWᵢ for LoRA and DoRA updates, in the base weight's stored layout.

Every layer kind reduces to a product in the 2-D view of the stored weight (rows × cols):

    ΔW = s · L @ R,   L (rows, r), R (r, cols)

- Linear, stored (out, in):                 L = B (out, r),            R = A (r, in)
- Conv1D, stored (in, out) (transposed):     L = Aᵀ (in, r),           R = Bᵀ (r, out)     [ΔW = (BA)ᵀ]
- Embedding, stored (num_emb, dim) (transposed): L = Aᵀ (num_emb, r),  R = Bᵀ (r, dim)     [ΔW = (BA)ᵀ]
- ConvNd, stored (out, in, *k) seen as (out, in·∏k): L = B (out, r),  R = A (r, in·∏k)
  (PEFT's conv_fn(Aᵀ, B) with a 1×1 lora_B kernel is exactly this channel mix; groups > 1 is refused
  as PEFT refuses to merge it.)
- nn.Parameter (target_parameters), 2-D, stored (out, in):  as Linear
- nn.Parameter, 3-D experts (E, d1, d2): expert e is a Linear of its own, A_e = rows e·r…e·r+r-1 of
  lora_A (r·E, in) and B_e = columns e, E+e, 2E+e … of lora_B (out, r·E) (PEFT's ParamWrapper reshapes
  lora_B to (out, r, E)); stored (E, out, in): L = B_e, R = A_e; stored (E, in, out) (transformers'
  is_transposed experts, transposed): L = A_eᵀ, R = B_eᵀ. The weight is merged expert by expert.

Whether a weight is stored transposed is the caller's `Update.transposed`, decided by the binding
(lorasurgery.binding.stored_transposed; linalg/update.py builds Updates): the kernel knows no layouts.

DoRA (PEFT's DoraLinearLayer / DoraEmbeddingLayer / DoraConvNdLayer): V = W + s·ΔW and
W' = (m / ‖V‖) ⊙ V with the norm taken per output feature of the layer's own (out, in) layout: per
stored row when L = B (Linear, Conv), per stored column when L = Aᵀ (Conv1D transposed back, and the
embedding's per-dimension norm). The norm is a constant of W and ΔW (PEFT detaches it).

Several updates of one weight are applied in order, as PEFT merges (and runs) several active
adapters: a LoRA adds w·s·ΔW; a DoRA replaces what is merged so far, M, by
(m / ‖W + w·s·ΔW‖)·(M + w·s·ΔW), its norm always that of the original W (PEFT's
`_unmerged_base_weight`), its weight w scaling s as a scaled `scaling` does in PEFT's forward.
Plain LoRA updates therefore add up exactly, in any order; a DoRA update also rescales the LoRA
updates before it.

Numerics: everything is computed in float32 (float64 when precise) from the stored values and rounded
once to the output dtype. The weight is processed in blocks of rows, so the only full-size buffer is
the weight itself (overwritten in place when the output dtype equals the stored dtype); column norms
take one extra pass over the blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorasurgery.errors import NonFiniteError, UnsupportedError
from lorasurgery.io.quantization import Rows

BLOCK_ELEMENTS = 1 << 19  # 512K elements: a 2 MB float32 block stays in cache between the passes


@dataclass
class Update:
    """One adapter's update of one base weight, from the adapter's own tensors."""

    module: str  # module path, for messages
    kind: str  # "linear" | "embedding" | "conv" | "parameter"
    A: torch.Tensor  # lora_A (r, in) / lora_embedding_A (r, num_emb) / conv (r, in, *k) / experts (r·E, in)
    B: torch.Tensor  # lora_B (out, r) / lora_embedding_B (dim, r) / conv (out, r, 1, …) / experts (out, r·E)
    scale: float  # α/r or α/√r
    weight: float = 1.0  # --weight (negated by --subtract)
    transposed: bool = False  # stored as ΔW's transpose: (in, out), (num_emb, dim), experts (E, in, out)
    magnitude: torch.Tensor | None = None  # DoRA lora_magnitude_vector (out,)
    source: str = ""  # adapter path, for messages
    experts: int = 0  # a 3-D expert parameter (experts, …): E

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def expert(self, e: int) -> Update:
        """Expert e's own update, a Linear one on the (d1, d2) slice W[e]."""
        E = self.experts
        r = self.A.shape[0] // E
        A = self.A.reshape(E, r, self.A.shape[-1])[e]  # (r, in)
        B = self.B.reshape(self.B.shape[0], r, E)[:, :, e]  # (out, r)
        return Update(
            module=f"{self.module}[expert {e}]",
            kind="linear",
            A=A,
            B=B,
            scale=self.scale,
            weight=self.weight,
            transposed=self.transposed,  # stored (in, out): ΔW[e] = s·(B_e@A_e)ᵀ
            source=self.source,
        )

    def factors(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(L, R, norm_per_row): ΔW = scale·L@R in the stored 2-D (rows, cols) view."""
        A, B = self.A, self.B
        if self.kind == "conv":
            r = A.shape[0]
            if B.dim() < 2 or B.shape[1] != r or any(k != 1 for k in B.shape[2:]):
                raise UnsupportedError(
                    f"{self.source}: module {self.module}: lora_B of shape {tuple(B.shape)} is a grouped or "
                    f"non-1×1 convolution; PEFT cannot merge it either"
                )
            L, R, per_row = B.reshape(B.shape[0], r), A.reshape(r, -1), True
        elif self.kind in ("linear", "embedding", "parameter") and not self.experts:
            # stored transposed: (rows, r), (r, cols) = Aᵀ, Bᵀ, the norm per stored column
            L, R, per_row = (A.T, B.T, False) if self.transposed else (B, A, True)
        else:
            raise UnsupportedError(
                f"{self.source}: module {self.module}: cannot merge layer kind {self.kind!r}"
            )
        if L.shape[0] != rows or R.shape[1] != cols or L.shape[1] != R.shape[0]:
            raise UnsupportedError(  # resolution checks shapes first; this is a guard
                f"{self.source}: module {self.module}: factors {tuple(A.shape)} / {tuple(B.shape)} do not "
                f"fit the base weight's ({rows}, {cols}) view"
            )
        if self.magnitude is not None and self.magnitude.numel() != (rows if per_row else cols):
            raise UnsupportedError(
                f"{self.source}: module {self.module}: DoRA magnitude has {self.magnitude.numel()} values, "
                f"expected one per output feature ({rows if per_row else cols})"
            )
        return L, R, per_row


def compute_dtype_for(precise: bool) -> torch.dtype:
    return torch.float64 if precise else torch.float32


def delta_weight(
    update: Update, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The plain LoRA ΔW = s·(BA) in the base weight's stored layout and `shape` (no DoRA, no weight)."""
    if update.experts:
        return torch.stack([delta_weight(update.expert(e), shape[1:], dtype=dtype) for e in range(shape[0])])
    rows, cols = shape[0], math.prod(shape[1:])
    L, R, _ = update.factors(rows, cols)
    return (L.to(dtype) @ R.to(dtype)).mul_(update.scale).reshape(shape)  # in place: one d×k buffer


def _block_rows(cols: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(cols, 1))


class _Prepared:
    """An update's factors on the compute device and dtype, with its DoRA factor once known."""

    def __init__(self, update: Update, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        L, R, self.per_row = update.factors(rows, cols)
        self.update = update
        self.L = L.to(device=device, dtype=dtype)  # (rows, r)
        self.R = R.to(device=device, dtype=dtype).contiguous()  # (r, cols)
        # A DoRA update's weight scales its s, as PEFT's forward does with a scaled `scaling`:
        # both its norm and its sΔ see w·s. A LoRA update's weight multiplies when it is added.
        self.alpha = update.scale * (update.weight if update.magnitude is not None else 1.0)
        self.magnitude = (  # conv DoRA stores it as (1, out, 1, …)
            None if update.magnitude is None else update.magnitude.reshape(-1).to(device=device, dtype=dtype)
        )
        self.factor: torch.Tensor | None = None  # m / ‖V‖ over the whole weight (column norms)

    def v_block(self, base: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """V[start:stop] = W + s·L@R for one block of rows, into `out`."""
        # (rows_b, cols) = (rows_b, cols) + s·(rows_b, r) @ (r, cols)
        return torch.addmm(base, self.L[start:stop], self.R, alpha=self.alpha, out=out)

    def dora_block(self, base: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """(m/‖W + sΔ‖)·(W + sΔ) for one block, W being `base`."""
        v = self.v_block(base, start, stop, out)
        if self.per_row:
            norm = torch.linalg.norm(v, dim=1)  # (rows_b,) as PEFT: per output feature
            v.mul_((self.magnitude[start:stop] / norm).unsqueeze(1))
        else:
            v.mul_(self.factor.unsqueeze(0))  # (1, cols): per stored column
        return v

    def dora_factor(self, base: torch.Tensor, start: int, stop: int, scratch: torch.Tensor) -> torch.Tensor:
        """m/‖W + sΔ‖ for one block, shaped to broadcast over it (the norm is always of the base W)."""
        if not self.per_row:
            return self.factor.unsqueeze(0)  # (1, cols)
        norm = torch.linalg.norm(self.v_block(base, start, stop, scratch), dim=1)  # (rows_b,)
        return (self.magnitude[start:stop] / norm).unsqueeze(1)


def merge_weight(
    weight,
    updates: list[Update],
    *,
    out_dtype: torch.dtype,
    precise: bool = False,
    device: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
    name: str = "",
) -> torch.Tensor:
    """W' = W + Σ wᵢ·ΔWᵢ for LoRA updates, DoRA updates applied in order as PEFT does (see the
    module docstring), computed blockwise and rounded once.

    `weight` is the base tensor as read (CPU, stored layout); it may be overwritten and returned when
    `out_dtype` equals its dtype. It may also be a quantized tensor's io.quantization.Rows: each
    block is then decoded straight into the block buffer it is merged in, and the float32 tensor is
    never whole (docs/design.md §13, "Decoding in bands").
    """
    if isinstance(weight, Rows) and any(u.experts for u in updates):
        weight = weight.whole()
    if any(u.experts for u in updates):
        return _merge_experts(weight, updates, out_dtype, precise, device, allow_nonfinite, name)
    shape = tuple(weight.shape)
    rows, cols = shape[0], math.prod(shape[1:])
    if isinstance(weight, Rows):
        out = torch.empty((rows, cols), dtype=out_dtype)
    else:
        flat = weight.reshape(rows, cols)  # a view: the stored 2-D layout
        out = flat if out_dtype == weight.dtype and weight.device.type == "cpu" else None
        if out is None:
            out = torch.empty((rows, cols), dtype=out_dtype)
    for start, stop, _, acc in merged_blocks(
        weight, updates, precise=precise, device=device, allow_nonfinite=allow_nonfinite, name=name
    ):
        out[start:stop].copy_(acc)  # the one rounding
    return out.reshape(shape)


def merged_blocks(
    weight,
    updates: list[Update],
    *,
    precise: bool = False,
    device: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
    name: str = "",
    keep_base: bool = False,
):
    """Yield (start, stop, W block, W′ block) over the rows of the 2-D view of `weight` (a tensor, or
    float32 io.quantization.Rows), W′ = W + Σ wᵢ·ΔWᵢ in the compute dtype, not yet rounded; both
    blocks are buffers reused by the next block. The W block is W′'s own buffer unless `keep_base`
    (or a DoRA update) needs W kept. The blocks are always the same rows, whoever consumes them: the
    BLAS kernel's result depends on a block's row count (merge --requantize relies on it)."""
    device = torch.device(device)
    dtype = compute_dtype_for(precise)
    shape = tuple(weight.shape)
    rows, cols = shape[0], math.prod(shape[1:])
    if isinstance(weight, Rows):
        decoded: list[torch.Tensor] = []  # float32 blocks, widened after (precise): as read whole

        def read(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
            if out.dtype == torch.float32:
                return weight.fill(start, stop, out)
            if not decoded:
                decoded.append(torch.empty(out.shape, dtype=torch.float32, device=out.device))
            return out.copy_(weight.fill(start, stop, decoded[0][: stop - start]))
    else:
        flat = weight.reshape(rows, cols)

        def read(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
            return out.copy_(flat[start:stop])  # (rows_b, cols) in the compute dtype

    prepared = [_Prepared(u, rows, cols, dtype, device) for u in updates]
    step = max(1, min(_block_rows(cols), rows))
    # Block buffers allocated once: a fresh allocation per block costs page faults (and mmap calls
    # once large blocks are mapped) that made the merge twice as slow.
    buffers = [torch.empty((step, cols), dtype=dtype, device=device) for _ in range(3)]

    def block(i: int, n: int) -> torch.Tensor:
        return buffers[i][:n]

    # Column norms (Conv1D, embedding DoRA) need all rows before any row can be scaled.
    for p in prepared:
        if p.magnitude is not None and not p.per_row:
            squares = torch.zeros(cols, dtype=torch.float64, device=device)
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                base = read(start, stop, block(0, stop - start))
                v = p.v_block(base, start, stop, block(1, stop - start))
                squares += torch.linalg.norm(v, dim=0).double().square()
            p.factor = p.magnitude / squares.sqrt().to(dtype)

    only_dora = len(prepared) == 1 and prepared[0].magnitude is not None
    any_dora = any(p.magnitude is not None for p in prepared)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        n = stop - start
        base = read(start, stop, block(0, n))
        if only_dora:
            acc = prepared[0].dora_block(base, start, stop, block(1, n))
        else:
            # accumulate in place unless DoRA (or the caller) still needs W itself
            acc = block(1, n).copy_(base) if any_dora or keep_base else base
            for p in prepared:
                w = p.update.weight
                if p.magnitude is None:
                    acc.addmm_(p.L[start:stop], p.R, alpha=w * p.alpha)  # acc += w·s·L@R
                else:  # PEFT: the DoRA factor scales what is merged so far plus its own sΔ
                    factor = p.dora_factor(base, start, stop, block(2, n))
                    acc.copy_(p.v_block(acc, start, stop, block(2, n)).mul_(factor))
        if not allow_nonfinite and not all_finite(acc):
            raise NonFiniteError(_nonfinite_message(name, updates))
        yield start, stop, base, acc


def _merge_experts(weight, updates, out_dtype, precise, device, allow_nonfinite, name) -> torch.Tensor:
    """A 3-D expert parameter (E, d1, d2): each expert's slice merged as a Linear weight of its own."""
    experts = weight.shape[0]
    if weight.dim() != 3 or any(u.experts != experts for u in updates):
        bad = next(u for u in updates if u.experts != experts or weight.dim() != 3)
        raise UnsupportedError(  # resolution checks shapes first; this is a guard
            f"{bad.source}: module {bad.module}: {bad.experts} experts do not fit the base's {name} "
            f"of shape {tuple(weight.shape)}"
        )
    out = weight if out_dtype == weight.dtype and weight.device.type == "cpu" else None
    if out is None:
        out = torch.empty(weight.shape, dtype=out_dtype)
    for e in range(experts):
        merged = merge_weight(
            weight[e],
            [u.expert(e) for u in updates],
            out_dtype=out_dtype,
            precise=precise,
            device=device,
            allow_nonfinite=allow_nonfinite,
            name=f"{name}[{e}]",
        )
        if merged.data_ptr() != out[e].data_ptr():
            out[e].copy_(merged)
    return out


def overwrite_rows(
    weight: torch.Tensor, rows: list[tuple[list[int], torch.Tensor]], *, out_dtype: torch.dtype
) -> torch.Tensor:
    """Trainable tokens: W[indices] = values for each (indices, values) in order, as PEFT's
    TrainableTokensLayer merges (index_copy: the saved rows replace the base's, or the rows merged so far)."""
    out = weight.to(out_dtype).clone() if weight.dtype != out_dtype else weight
    for indices, values in rows:
        out[torch.tensor(indices, dtype=torch.long)] = values.to(out_dtype)
    return out


def merge_bias(
    bias: torch.Tensor,
    terms: list[tuple[torch.Tensor, float]],
    *,
    out_dtype: torch.dtype,
    precise: bool = False,
    allow_nonfinite: bool = False,
    name: str = "",
    modules: str = "",
) -> torch.Tensor:
    """b' = b + Σ cᵢ·vᵢ (lora_bias: vᵢ = lora_B.bias, cᵢ = wᵢ·sᵢ), rounded once."""
    dtype = compute_dtype_for(precise)
    acc = bias.to(dtype).clone()
    for vector, coefficient in terms:
        acc.add_(vector.to(dtype), alpha=coefficient)
    if not allow_nonfinite and not all_finite(acc):
        raise NonFiniteError(
            f"merging {modules or name} gives NaN/Inf in {name}; pass --allow-nonfinite to go on"
        )
    return acc.to(out_dtype)


def all_finite(block: torch.Tensor) -> bool:
    # A NaN or Inf anywhere makes the sum non-finite; a finite sum proves every value finite. Only a
    # non-finite sum (or an overflow of huge values) pays for the exact elementwise test.
    if math.isfinite(float(block.sum())):
        return True
    return bool(torch.isfinite(block).all())


def _nonfinite_message(name: str, updates: list[Update]) -> str:
    modules = ", ".join(sorted({f"{u.module} (from {u.source})" if u.source else u.module for u in updates}))
    return f"merging module {modules} gives NaN/Inf in {name}; pass --allow-nonfinite to go on"
