"""MobileNetV1 and MobileNetV2 for JAX/Flax."""

from mobilenet_jax.models import MobileNetV1, MobileNetV2, create_model, reset_classifier

__all__ = ["MobileNetV1", "MobileNetV2", "ModelSummary", "create_model", "reset_classifier", "summarize"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `summarize` is imported on first use, so that `python -m mobilenet_jax.summary`
    # runs a module the package has not imported yet.
    if name in ("summarize", "ModelSummary"):
        from mobilenet_jax import summary

        return getattr(summary, name)
    raise AttributeError(f"module 'mobilenet_jax' has no attribute {name!r}")
