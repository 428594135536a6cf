"""Ray Tune searches over GAN training: the trial (`trainable`, `make_trainable`) and the driver
(`search`), as the README shows them: ``from ganray.orchestrator.tune import search``."""

from ganray.orchestrator.tune.driver import SearchResult, search
from ganray.orchestrator.tune.trial import make_trainable, placement_factory, trainable

__all__ = ["SearchResult", "search", "make_trainable", "placement_factory", "trainable"]
