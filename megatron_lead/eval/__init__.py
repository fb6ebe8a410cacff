"""Reading runs back: before/after tables and plots (report.py)."""
