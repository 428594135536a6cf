"""The learners other than the GAN, each a table of phases run by the same trainer (issue 17).

`model.learner` names one; `build_replica` (workers/stepper.py) builds it through `learner_class`.
`gan` is not here: it is `ReplicaStepper`, unchanged. How a learner plugs in: `base.py`.
"""

from __future__ import annotations

import importlib
from typing import Any

# learner name -> "module:Class" (imported when used, so one learner's module never loads another's).
LEARNERS: dict[str, str] = {
    "ae": "ganray.workers.learners.autoencoder:AutoencoderStepper",
    "vae": "ganray.workers.learners.autoencoder:VAEStepper",
    "energy": "ganray.workers.learners.energy:EnergyStepper",
}


def learner_class(name: str) -> Any:
    """The stepper class of learner `name` (the config has already refused unknown names)."""
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; known: gan, {', '.join(sorted(LEARNERS))}")
    module, _, cls = LEARNERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
