"""budgetlm: train a language model on one GPU within a fixed time budget."""

__version__ = "0.1.0"
