"""``python -m mobilenet_jax.prune`` and ``from mobilenet_jax import prune``, as before the package had subpackages.

The module is :mod:`mobilenet_jax.compression.prune`.
"""

from mobilenet_jax.compression.prune import *  # noqa: F403
from mobilenet_jax.compression.prune import run_command

if __name__ == "__main__":
    run_command()
