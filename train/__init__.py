"""noisymix training: configuration, models, methods, the epoch loop, checkpoints and logs."""
from .version import __version__  # noqa: F401
