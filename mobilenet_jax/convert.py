"""``python -m mobilenet_jax.convert`` and ``from mobilenet_jax import convert``, as before the package had subpackages.

The module is :mod:`mobilenet_jax.weights.convert`.
"""

from mobilenet_jax.weights.convert import *  # noqa: F403
from mobilenet_jax.weights.convert_cli import run_command

if __name__ == "__main__":
    run_command()
