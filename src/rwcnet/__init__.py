"""rwcnet: RWCNet (recurrence with correlation) for 3D deformable image registration."""

__version__ = "0.1.0"
