"""Pure tensor math (no model objects): saliency scores, clustering, merging, least squares, SVD."""
