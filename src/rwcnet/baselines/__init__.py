"""Comparators of the paper's tables: ConvexAdam (``convexadam``) and classical peers run in their own
environments (``peers``: ANTs SyN, elastix B-spline, greedy). LapIRN is a network: :mod:`rwcnet.model.lapirn`,
loaded and run like RWCNet (``register(model=LAPIRN_FILE)``)."""
