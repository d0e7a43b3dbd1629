"""Alias of the ms1mv2 preset (InsightFace distributes MS1MV2 as the folder faces_emore)."""
from recognition.configs.ms1mv2 import config

__all__ = ["config"]     # the preset's one name, re-exported
