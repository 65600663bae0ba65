"""Kandinsky serving: a KServe predictor for ruDALL-E (Kandinsky 12B, Malevich XL)."""

__version__ = "0.1.0"
