"""LAFTR: the training-set summary and the function space distance estimators built on it."""
