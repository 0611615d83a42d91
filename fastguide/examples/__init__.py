"""Worked examples that double as demos: exact models whose right answers are known."""
