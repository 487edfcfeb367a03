"""Dataset sources behind one interface (data_prep.sources.base.Source)."""

from data_prep.sources.base import Example, Source
from data_prep.sources.conversations import JsonlQASource, LlavaSource
from data_prep.sources.scienceqa import ScienceQASource

__all__ = ["Example", "JsonlQASource", "LlavaSource", "ScienceQASource", "Source"]
