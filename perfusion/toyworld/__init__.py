"""The toy world: a procedural scene generator with exact ground truth (world.py) and its oracle."""
