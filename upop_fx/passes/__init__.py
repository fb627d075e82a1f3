"""Graph passes: analysis (FindGroups) and transformation (Surgery)."""

from .base import GraphPass, PassResult
from .find_groups import FindGroups, find_groups
from .insert_masks import InsertMasks, MaskState, get_masks
from .surgery import Surgery, SurgeryInfo

__all__ = ["GraphPass", "PassResult", "FindGroups", "find_groups", "InsertMasks", "MaskState", "get_masks", "Surgery", "SurgeryInfo"]
