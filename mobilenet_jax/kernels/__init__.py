"""CPU kernels written in C++ and called from JAX through ``jax.ffi``, compiled on first use."""
