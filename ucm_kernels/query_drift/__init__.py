"""Selection reuse's drift rule (``GSAConfig.select_drift``): which rows of a layer select afresh because their
queries turned since their lists were made.

    fresh = query_drift(q, kept_q, slots, reselect, threshold=0.1)

Row ``r`` of a decode step holds its request's slot ``slots[r]``; ``kept_q[slots[r]]`` is the query that row's
layer selected with last. The row's drift is one minus the mean, over its query heads, of the cosine similarity
between each head's current query ``q[r, h]`` and its kept one (fp32; a zero norm counts as similarity 0). The row
selects afresh (``fresh[r]`` 1) when the step's rule says so (``reselect[r]`` nonzero) or its drift exceeds
``threshold``; a fresh row's query becomes its slot's kept one (``kept_q`` updated in place), so drift is always
measured from the query the lists were selected with. ``fresh`` is the layer's ``reselect`` mask for the selection
kernels. The Triton launch is one program per row, one launch per layer (before the layer's selection).
"""
from .naive import naive_query_drift
from .torch import query_drift as torch_query_drift
from .triton import query_drift

__all__ = ["naive_query_drift", "query_drift", "torch_query_drift"]
