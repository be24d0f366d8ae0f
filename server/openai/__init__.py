"""The OpenAI-compatible API's request handling, one module per concern (see server/app.py for the routes)."""
