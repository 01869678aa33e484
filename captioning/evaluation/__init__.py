"""Evaluation: the official COCO caption metrics and the synthetic checker."""
