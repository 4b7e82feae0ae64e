"""Hyperparameter sweeps (`sweep`): many `fit` runs over a search space, with Optuna. The core library never imports
them."""
