"""Configuration search (``conpet search``): an Optuna study over PET method, placement, size and
learner settings, tuned on dev rows of one stream and reported on another (the two-phase protocol)."""

from conpet.search.space import Space, load_space
from conpet.search.study import SearchResult, is_search_dir, report_search, search

__all__ = ["SearchResult", "Space", "is_search_dir", "load_space", "report_search", "search"]
