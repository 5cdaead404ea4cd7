"""Helpers for the Streamlit pages (state namespacing, error rendering, forms, presets, snippets).

Pages stay thin: they read widgets, call `quantlib`, and render with these helpers. Modules that
only compute (presets, snippets, querystring, forms' pure parts) are importable without a running
Streamlit script, so unit tests can use them directly.
"""
