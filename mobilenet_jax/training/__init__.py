"""Training: config defaults, optimiser and schedule, the compiled steps, the mesh, metrics and the loop."""
