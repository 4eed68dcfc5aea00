"""VeRA on Flax NNX models: typed variables on the modules, and a pure view over ``nnx.split``.

`attach(model, config)` adapts a model in place, NNX's way:

- each adapted module gets ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out,) as `VeraVector`
  variables, a subclass of ``nnx.LoRAParam``: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``,
  ``nnx.DiffState`` and tunix's ``PeftTrainer`` train them and nothing else. A stack of L layers (built
  with ``nnx.vmap``, run with ``nnx.scan``) gets (L, r) and (L, out), so each scan iteration slices its own.
  Vectors are sharded with their kernel (``nnx.with_partitioning``; see `vera_jax.nnx.variables`);
- the model gets one pair ``model.vera_projections.A`` (r, in_max) / ``.B`` (out_max, r) of
  `VeraProjection` variables, which are not ``nnx.Param``: never trained, never in a Param filter;
- the adapted modules' class becomes a subclass that adds VeRA to the call, on the merged or the
  activation path (see `vera_jax.nnx.modules`).

`split` gives the pure view (the base model's graphdef, its params and a `vera_jax.Adapter`) for
`vera_jax.merge` and the rest of the library; `functional` runs the adapted model as a pure function of
(params, adapter) on either path; `update` writes an adapter back; `mixed` runs a batch in
which each example uses its own adapter of a stack.
"""

from vera_jax.nnx.attach import PATHS, adapted_modules, attach, split, update
from vera_jax.nnx.functional import functional
from vera_jax.nnx.mixed import mixed
from vera_jax.nnx.modules import bound
from vera_jax.nnx.variables import VeraProjection, VeraVector

__all__ = ["VeraVector", "VeraProjection", "attach", "bound", "split", "update", "functional", "mixed",
           "adapted_modules", "PATHS"]
