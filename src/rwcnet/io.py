"""The public file API of the README (``from rwcnet.io import write_field``): images, fields and keypoints on disk.

The implementation is :mod:`rwcnet.data.formats`; this module only names its public functions.
"""

from rwcnet.data.formats import (
    Image,
    read_field,
    read_image,
    read_itk_field,
    read_keypoints,
    write_field,
    write_image,
    write_itk_field,
)

__all__ = ["Image", "read_field", "read_image", "read_itk_field", "read_keypoints", "write_field", "write_image",
           "write_itk_field"]
