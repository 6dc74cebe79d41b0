"""New campaign: CSV upload with column mapping, the import report, the template editor (variables,
SMS encoding and segments, live preview); Edit of a Ready campaign's template.
"""
from __future__ import annotations

from services.api.console.routes import console_router

router = console_router()
