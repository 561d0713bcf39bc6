"""Stage-wise training: config and presets (``config``), data sources (``data``, SynthMorph-style ``synthmorph*``),
one optimisation step and validation (``steps``, ``label_dice``), the loop (``loop``), checkpoints and DDP
(``runtime``) and the JSON-lines log (``log``)."""
