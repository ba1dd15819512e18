"""Bytes on disk: weight files and their checks, the network registry, images, the catalogue, downloads."""
