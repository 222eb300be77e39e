"""MobileNetV1, V2, V3 and V4 (convolutional) for JAX/Flax."""

from mobilenet_jax.models import MobileNetV1, MobileNetV2, MobileNetV3, MobileNetV4, create_model, reset_classifier

__all__ = [
    "MobileNetV1",
    "MobileNetV2",
    "MobileNetV3",
    "MobileNetV4",
    "ModelSummary",
    "create_model",
    "list_pretrained",
    "pretrained",
    "reset_classifier",
    "summarize",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `summarize` is imported on first use, so that `python -m mobilenet_jax.summary`
    # runs a module the package has not imported yet.
    if name in ("summarize", "ModelSummary"):
        from mobilenet_jax import summary

        return getattr(summary, name)
    if name in ("pretrained", "list_pretrained"):  # orbax and the Hub client only when asked for
        from mobilenet_jax.weights import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'mobilenet_jax' has no attribute {name!r}")
