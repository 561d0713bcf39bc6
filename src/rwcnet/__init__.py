"""rwcnet: RWCNet (recurrence with correlation) for 3D deformable image registration."""

import os

# The correlation and recurrent loop issue thousands of small torch ops; with OpenMP's default
# spin-waiting they run 4-10x slower whenever the cores are shared (measured in
# benchmarks/correlation_cost.py). Passive waiting is the default here unless the user set one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
