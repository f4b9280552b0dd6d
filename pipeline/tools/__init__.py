"""Command-line tools above every layer: the sample viewer, the tiny-target builder, install helpers."""
