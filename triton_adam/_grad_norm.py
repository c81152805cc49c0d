"""Global gradient norm over many tensors with the Triton reduction kernels, without host sync."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._tables import (ALIGNED_TILE_SIZE, ALIGNMENT, BLOCK_SIZE, NUM_WARPS, UNALIGNED_TILE_SIZE,
                      build_block_map, on_device, to_device, triton_dtype)
from .kernels import adam_step as K
from .kernels import grad_norm as N

NORM_CODES = {1.0: 1, 2.0: 2, float("inf"): N.NORM_INF}


@dataclass
class NormSource:
    """One launch's worth of grads: tables in the step kernel's layout, one grad dtype."""
    tensor_table: Tensor
    grad_table: Tensor
    block_map: Tensor
    n_blocks: int
    grad_dtype: object  # a triton dtype
    aligned: bool
    block_size: int = BLOCK_SIZE  # elements per program of block_map

    def launch(self, partials, counts, offset, code, warmup=False):
        """The partial reduction of these grads into ``partials[offset:offset + n_blocks]``
        (and their non-finite counts), or with ``warmup`` its compilation only."""
        tile = min(ALIGNED_TILE_SIZE if self.aligned else UNALIGNED_TILE_SIZE, self.block_size)
        N.launch_grad_norm_partials(self.tensor_table, self.grad_table, self.block_map, partials,
                                    counts, offset, self.n_blocks, self.grad_dtype, code,
                                    self.aligned, self.block_size, tile, NUM_WARPS,
                                    warmup=warmup)

    @classmethod
    def from_bucket(cls, bucket):
        """The bucket's grads as the step sees them: one source per block range."""
        return [cls(bucket.tensor_table, bucket.grad_table, r.block_map, r.n_blocks,
                    bucket.spec["GRAD_DTYPE"], r.aligned, bucket.block_size)
                for r in bucket.ranges]

    @classmethod
    def from_grads(cls, grads):
        """Tables for a list of same-dtype, same-device dense grads (built per call)."""
        n = len(grads)
        device = grads[0].device
        table = np.zeros((n, int(K.TABLE_WIDTH)), dtype=np.int64)
        table[:, int(K.COL_NUMEL)] = [g.numel() for g in grads]
        ptrs = np.array([g.data_ptr() for g in grads], dtype=np.int64)
        block_map = build_block_map(-(-table[:, int(K.COL_NUMEL)] // BLOCK_SIZE))
        return cls(to_device(table, device), to_device(ptrs, device),
                   to_device(block_map, device), len(block_map),
                   triton_dtype(grads[0].dtype), not (ptrs % ALIGNMENT).any())


class TritonGradNorm:
    """Partial buffers for a fixed set of sources; ``run`` gives (norm, non-finite flag)."""

    def __init__(self, sources_or_buckets, device=None):
        n_partials = sum(s.n_blocks for s in sources_or_buckets)
        device = device or sources_or_buckets[0].device
        self.partials = torch.empty(max(n_partials, 1), dtype=torch.float32, device=device)
        self.counts = torch.empty(max(n_partials, 1), dtype=torch.int32, device=device)
        self.norm = torch.empty((), dtype=torch.float32, device=device)
        self.flag = torch.empty((), dtype=torch.float32, device=device)
        self.n_partials = n_partials

    def run(self, sources, grad_scale=None, found_inf=None, norm_type=2.0):
        """Launch one reduction per source and the finalize kernel.

        Returns 0-d float32 tensors (fresh copies): the norm of the grads divided by
        ``grad_scale`` (when given), and 1.0 when any grad element is NaN/inf or ``found_inf``
        is set, else 0.0.
        """
        with on_device(self.norm.device):
            return self._run(sources, grad_scale, found_inf, NORM_CODES[float(norm_type)])

    def _run(self, sources, grad_scale, found_inf, code):
        n_partials = self._partials(sources, code)
        N.launch_grad_norm_finalize(self.partials, self.counts, n_partials, self.norm, self.flag,
                                    code, found_inf, grad_scale)
        return self.norm.clone(), self.flag.clone()

    def run_segments(self, sources, segment_of_partial, n_segments, norm_type=2.0):
        """Per-segment totals before any cross-rank reduction (see ``_distributed``).

        ``segment_of_partial`` is an int32 device tensor giving the segment of every block of
        the sources, in order. Returns float32 ``[n_segments]`` raw totals (sums of g*g or |g|,
        max |g| for inf; not square-rooted, not unscaled) and the 0-d non-finite flag.
        """
        code = NORM_CODES[float(norm_type)]
        with on_device(self.norm.device):
            n_partials = self._partials(sources, code)
            totals = torch.empty(n_segments, dtype=torch.float32, device=self.norm.device)
            N.launch_grad_norm_segments(self.partials, self.counts, segment_of_partial,
                                        n_partials, totals, self.flag, code)
        return totals, self.flag.clone()

    def _partials(self, sources, code) -> int:
        """One partial-reduction launch per source; returns the number of partials written."""
        offset = 0
        sources = [s for source in sources
                   for s in ([source] if isinstance(source, NormSource)
                             else NormSource.from_bucket(source))]
        for source in sources:
            source.launch(self.partials, self.counts, offset, code)
            offset += source.n_blocks
        return offset
