"""Graph passes, each configured in ``__init__`` and called as ``pass_(gm) -> PassResult``, its contract
(``requires``/``ensures``, in place or functional, an honest ``modified``) checked by :mod:`.base`:

* :class:`FindGroups` — the analysis: which channels must be removed together (in place, never modifies);
* :class:`SortExperts` — each expert's neurons of a stacked MoE layer in order of magnitude (in place);
* :class:`InsertMasks` — one learnable mask per ranking structure (functional);
* :class:`~upop_fx.passes.fuse_attention.FuseMaskedAttention` — masked attention into the kernel op (in place);
* :class:`Surgery` — cut the removed channels out, checked against the zeroed reference (functional).
"""

from .base import GraphPass, PassResult
from .find_groups import FindGroups
from .fuse_attention import FuseMaskedAttention, FusionReport
from .insert_masks import InsertMasks, MaskState, MaskTag, get_masks
from .sort_experts import SortExperts
from .surgery import Surgery, SurgeryInfo

__all__ = [
    "GraphPass", "PassResult", "FindGroups", "SortExperts", "InsertMasks", "MaskState", "MaskTag", "get_masks",
    "FuseMaskedAttention", "FusionReport", "Surgery", "SurgeryInfo",
]
