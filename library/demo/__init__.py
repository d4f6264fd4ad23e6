"""The embedded demo: a procedural world of 64 px images, its tiny pretrained model and classifier."""
