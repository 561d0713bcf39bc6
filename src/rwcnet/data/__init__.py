"""Data on disk, shared by registration, training and evaluation: ``formats`` (images, fields, keypoints and
ITK fields in one convention) and ``datasets`` (Learn2Reg dataset JSON, pairs and file names); the package
also ships ``freesurfer_aseg.tsv``."""
