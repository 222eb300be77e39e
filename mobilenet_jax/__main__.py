"""``python -m mobilenet_jax <train|evaluate|export|prune|convert|summary> ...``: the ``mobilenet-jax`` command."""

from mobilenet_jax import cli

if __name__ == "__main__":
    cli.main()
