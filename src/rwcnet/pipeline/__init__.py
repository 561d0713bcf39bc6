"""The registration pipeline: one prepared pair, a chain of pluggable methods, one instrumentation.

:func:`rwcnet.register.register` runs it:

1. the options are checked into :class:`Settings`;
2. the chain is built: ``register(method=NAME)`` names a chain of :data:`CHAINS`
   (``rwcnet``: network, instance optimisation, refinement; ``convexadam``), a
   single registered method, or a sequence of method names. Each name's builder,
   registered with :func:`register_method`, returns a :class:`Method` or ``None``
   when the settings switch it off;
3. the pair is prepared once (:class:`PreparedPair`): read, the moving image
   resampled once onto the fixed grid, normalised once (the first method that
   declares ``intensities`` decides how, else the modality's preset);
4. each method runs in turn, timed, its progress reported through the one
   :class:`Instrumentation`;
5. the original moving image is sampled once through the final field.

The :class:`Method` contract (all a new method needs, e.g. an affine step)::

    class MyMethod(Method):
        stage = "my method"     # the progress display's name (None: the method announces its own stages)
        key = "my_method"       # its entry in the result's ``seconds`` and ``peak_gb``
        def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor:
            ...                 # return the TOTAL field (1, 3, X, Y, Z) in fixed voxels on the fixed grid

    @register_method("my_method")
    def build(settings: Settings, record: Instrumentation) -> MyMethod | None:
        return MyMethod()

``init`` is the field of the methods before it (``None``: identity, the first method).
A method that can start from a field (instance optimisation, refinement)
continues from ``init``; one that cannot (the network, ConvexAdam's discrete
step) registers ``pair.moving_through(init)`` (the moving image sampled once
through ``init``) and returns ``geometry.compose(residual, init)``. Report steps
with ``record.step(done, total, value)``, extra stages with ``record.stage(name)``,
notes and warnings in ``record.notes`` / ``record.warnings``.
"""

from rwcnet.pipeline.instrument import Instrumentation, StageCallback, StepCallback
from rwcnet.pipeline.method import CHAINS, METHODS, Method, Settings, build_chain, register_method
from rwcnet.pipeline.pair import PreparedPair
from rwcnet.pipeline import methods as _methods, network as _network  # noqa: F401  (they register the built-in methods)

__all__ = ["CHAINS", "METHODS", "Instrumentation", "Method", "PreparedPair", "Settings", "StageCallback",
           "StepCallback", "build_chain", "register_method"]
