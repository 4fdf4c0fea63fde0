"""Shapley-based mixed-precision search (SMPQ) under board budgets, with baselines."""
