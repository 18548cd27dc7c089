"""Metrics, benchmark tables, figures and reports."""
