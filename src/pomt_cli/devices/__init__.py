"""The device: presets, torch devices, clock control and signals."""
