"""A perplexity benchmarking harness: configs in, trustworthy, comparable perplexity records out."""

__version__ = "0.1.0"

from .config import RunConfig, load_config  # noqa: E402
from .errors import HarnessError  # noqa: E402


def run(cfg, *args, **kwargs):
    """Evaluate a RunConfig; see ``harness.runner.run``."""
    from .runner import run as _run

    return _run(cfg, *args, **kwargs)


__all__ = ["HarnessError", "RunConfig", "load_config", "run", "__version__"]
