"""One way to step into the calls of chosen Flax linen modules: `intercept_layers`.

Every feature that changes or watches what a layer of an unedited Flax model does (the activation
path, mixed-adapter batches, the search for layers that share an input, the benchmark's floor) goes
through this helper over ``flax.linen.intercept_methods``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterator
from typing import Any

import flax.linen as nn

from vera_jax.paths import SEP

__all__ = ["LayerCall", "intercept_layers"]


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of an intercepted module's ``__call__``.

    Attributes:
      path: the module's '/'-joined path, as in the params tree.
      module: the Flax module instance.
      args, kwargs: the arguments of the call.
      run: runs the module as it would have run, with the same arguments.
    """

    path: str
    module: nn.Module
    args: tuple
    kwargs: dict
    run: Callable[[], Any]

    @property
    def x(self) -> Any:
        """The layer input: the first positional argument, or ``inputs=`` (``nn.Dense``, ``FlaxConv1D``)."""
        return self.args[0] if self.args else self.kwargs["inputs"]


@contextlib.contextmanager
def intercept_layers(paths: Collection[str], handler: Callable[[LayerCall], Any]) -> Iterator[None]:
    """Within the context, a ``__call__`` of a module whose path is in ``paths`` returns ``handler(call)``.

    Every other call runs unchanged. Use it inside the traced function: it acts while the model runs.
    """

    def interceptor(next_fun, args, kwargs, context):
        path = SEP.join(context.module.path)
        if context.method_name != "__call__" or path not in paths:
            return next_fun(*args, **kwargs)
        return handler(LayerCall(path, context.module, args, kwargs, lambda: next_fun(*args, **kwargs)))

    with nn.intercept_methods(interceptor):
        yield
