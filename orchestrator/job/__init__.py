"""The training job: config, trainer loop, engines (local and the Ray coordinator), placement,
faults, checkpoints and evaluation."""
