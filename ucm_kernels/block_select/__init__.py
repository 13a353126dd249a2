"""GSA block selection: per (request, KV head), the init window, the local window and the top-scoring blocks.

    sel_idx, sel_count = select_blocks(q, kmin, kmax, kmean, block_table, seq_lens, block_size=16,
                                       sparse_ratio=0.3, init_window=1, local_window=4, min_blocks=8)

A pure function of tensors (no host sync, output width from shapes only): time it as it is, once per layer
per decode step. Every layer of a step shares shapes and settings, so plan once and run per layer (no scalar
checks, no scratch allocation per call):

    plan = plan_select(batch, num_kv_heads, head_dim, max_blocks, block_size=16, sparse_ratio=0.3,
                       init_window=1, local_window=4, min_blocks=8, device=q.device)
    for layer in layers:
        sel_idx, sel_count = plan.run(q, kmin, kmax, kmean, block_table, seq_lens)

``torch.py`` holds the vectorised twins (the CPU path): ``torch_select_blocks``, ``torch_block_scores``. The
reprs come from ``ucm_kernels.block_repr``; the lists feed ``ucm_kernels.sparse_decode``. fp8 reprs
(``empty_block_repr(key_cache, torch.float8_e4m3fn)``) halve the bytes selection reads; pass their scales as
``kscale=`` (Quest's score stays an upper bound: kmin/kmax are rounded outward).
"""
from .naive import naive_block_scores, naive_num_selected, naive_select_blocks
from .torch import block_scores as torch_block_scores
from .torch import select_blocks as torch_select_blocks
from .triton import SelectPlan, plan_select, select_blocks, select_from_scores, selection_counts, selection_width

__all__ = ["select_blocks", "select_from_scores", "selection_width", "selection_counts", "plan_select", "SelectPlan",
           "naive_select_blocks", "naive_block_scores", "naive_num_selected", "torch_select_blocks",
           "torch_block_scores"]
