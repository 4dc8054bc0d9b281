"""Models: the video LLM, its video-token layouts and the autoregressive reconstruction module."""
