"""xcryonet: automated cryo-EM grid-square screening."""

__version__ = "0.1.0"
