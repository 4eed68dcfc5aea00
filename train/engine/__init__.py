"""The training machinery every job shares: data, the mesh, the jitted steps, the run's loop, checkpoints and
metrics."""
