"""Evaluation: language-model loss and bits per byte (`lm`), task metrics (`metrics`) and the
built-in downstream suite (`suite`)."""
