"""``rwcnet synth-preview``: write a few SynthMorph-style training pairs (images and merged labels) for a look."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from rwcnet.errors import InputError


def _grid(reference, factor: int):
    """The reference grid ``factor`` times coarser (cell-centred voxels over the same box): an :class:`Image` template."""
    from rwcnet.data.formats import Image

    affine = reference.affine.copy()
    affine[:3, :3] = reference.affine[:3, :3] * factor
    affine[:3, 3] = reference.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + reference.affine[:3, 3]
    shape = tuple(n // factor for n in reference.shape)
    return Image(np.zeros(shape, np.float32), affine)


def synth_preview(
    output: Path = typer.Option(..., "--output", "-o", help="folder for pairNN_{fixed,moving}[_labels].nii.gz and preview.png"),
    pairs: int = typer.Option(4, "--pairs", min=1, max=20, help="number of pairs"),
    factor: int = typer.Option(2, "--factor", min=1, max=8, help="synthesis grid: 1/factor of the reference's resolution"),
    seed: int = typer.Option(0, "--seed", help="seed of the first pair (pair i uses seed + i)"),
    config: str = typer.Option("synth-brain", "--config", help="training preset or YAML whose data.synthmorph settings are used"),
    maps: Optional[list[int]] = typer.Option(None, "--map", help="label map numbers to draw from (repeatable; default: the training maps)"),
) -> None:
    """Synthesise pairs from the SynthSeg label maps as training does, and write them as NIfTI images and a PNG.

    Each pair is two maps (or one map twice) with random deformations and
    contrasts; labels are the merged classes' most likely class per voxel
    (value = the class's FreeSurfer label). Paths in the config are relative
    to the current folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rwcnet.data.formats import read_image, write_image
    from rwcnet.training.config import load_config
    from rwcnet.training.data import TrainingData

    settings = load_config(config)
    if settings.data.synthmorph is None:
        raise InputError(f"{config}: the config has no data.synthmorph section")
    source = TrainingData(settings, alignment=1).label_pairs
    numbers = list(maps) if maps else list(settings.data.synthmorph.train_maps)
    grid = _grid(read_image(source.maps.reference_path), factor)
    classes = np.array([0, *source.table.classes])
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    figure, axes = plt.subplots(pairs, 4, figsize=(10, 2.6 * pairs), squeeze=False)
    for index in range(pairs):
        first = numbers[int(rng.integers(len(numbers)))]
        second = numbers[int(rng.integers(len(numbers)))]
        _, pair = source.pair(first, second, factor, seed + index)
        for role, image, onehot in (("fixed", pair.fixed, pair.fixed_onehot), ("moving", pair.moving, pair.moving_onehot)):
            background = 1.0 - onehot.sum(dim=1, keepdim=True)
            labels = classes[np.concatenate([background.numpy(), onehot.numpy()], axis=1)[0].argmax(axis=0)]
            array = image[0, 0].numpy()
            write_image(output / f"pair{index:02d}_{role}.nii.gz", array, grid)
            write_image(output / f"pair{index:02d}_{role}_labels.nii.gz", labels.astype(np.int16), grid)
            column = 0 if role == "fixed" else 2
            middle = array.shape[2] // 2
            axes[index, column].imshow(np.rot90(array[:, :, middle]), cmap="gray", vmin=0, vmax=1)
            axes[index, column + 1].imshow(np.rot90(labels[:, :, middle]), cmap="tab20", interpolation="nearest")
            kind = "skull-stripped" if pair.skull_strip else "whole head"
            axes[index, column].set_title(f"{role}: map {first if role == 'fixed' else second} ({kind})", fontsize=8)
        for axis in axes[index]:
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(output / "preview.png", dpi=80)
    plt.close(figure)
    typer.echo(f"{output}: {pairs} pairs at 1/{factor} resolution (NIfTI) and preview.png")
