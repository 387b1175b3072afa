"""Checkpoints in: both layouts (Diffusers and the Wan team's original), their conversion, LoRAs, and the
full-size random and tiny builds that tests and benchmarks use instead of downloaded weights.
"""
