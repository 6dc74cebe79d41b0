"""The web console (issue 14): server-rendered pages under /console, served by the API (routes.py)."""
