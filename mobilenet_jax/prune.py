"""``python -m mobilenet_jax.prune`` and ``from mobilenet_jax import prune``, as before the package had subpackages.

The library is :mod:`mobilenet_jax.compression.prune` (and :mod:`mobilenet_jax.compression.amc` for the
search); the command is :mod:`mobilenet_jax.compression.prune_cli`.
"""

from mobilenet_jax.compression.prune import *  # noqa: F403
from mobilenet_jax.compression.prune_cli import run_command

if __name__ == "__main__":
    run_command()
