"""``python -m mobilenet_jax.export`` and ``from mobilenet_jax import export``, as before the package had subpackages.

The module is :mod:`mobilenet_jax.deployment.export`.
"""

from mobilenet_jax.deployment.export import *  # noqa: F403
from mobilenet_jax.deployment.export import run_command

if __name__ == "__main__":
    run_command()
