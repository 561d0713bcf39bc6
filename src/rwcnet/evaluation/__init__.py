"""Scoring exactly like the official Learn2Reg evaluation: ``metrics`` (Dice, HD95, SDlogJ, folding, TRE),
``surface_distance`` (HD95's surface distances) and ``label_names`` (FreeSurfer aseg names for tables)."""
