"""Video primitives: frame decoding, spatial pooling and frame-level attention masks."""
