"""Accuracy against kept tokens: image data, estimators, distributed evaluation."""
