"""TokenUnify: mixed random-token / next-token / next-all prediction on raster patch tokens, Mamba backbone."""
