"""Graph passes: analysis (FindGroups) and transformation (Surgery)."""

from .base import GraphPass, PassResult
from .find_groups import FindGroups, find_groups
from .surgery import Surgery, SurgeryInfo

__all__ = ["GraphPass", "PassResult", "FindGroups", "find_groups", "Surgery", "SurgeryInfo"]
