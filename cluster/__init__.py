"""Wiring: configs, the CLI, Ray placement and the training loop driver."""
