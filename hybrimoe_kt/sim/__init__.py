"""Trace-driven simulator: replays routing through a strategy on a model of CPU, GPU and PCIe."""
