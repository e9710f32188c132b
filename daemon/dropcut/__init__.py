"""dropcut: a hot-folder daemon that turns photos into transparent PNG cut-outs."""

__version__ = "0.1.0"
