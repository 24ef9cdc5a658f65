"""Self-influence solvers (proximal and linear on the LAFTR summary) and their baselines."""
