"""Graph passes: analysis (FindGroups) and transformation (Surgery)."""

from .base import GraphPass, PassResult
from .find_groups import FindGroups
from .insert_masks import InsertMasks, MaskState, get_masks
from .surgery import Surgery, SurgeryInfo

__all__ = ["GraphPass", "PassResult", "FindGroups", "InsertMasks", "MaskState", "get_masks", "Surgery", "SurgeryInfo"]
