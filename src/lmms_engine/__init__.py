"""lmms-video: a lean training engine for video large multimodal models.

Importing the package is cheap: submodules (models, data, train, launch) load on first use.
"""

__version__ = "0.1.0"
