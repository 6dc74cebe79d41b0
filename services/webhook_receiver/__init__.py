"""The webhook receiver service: provider callbacks in, internal records out (app.py)."""
