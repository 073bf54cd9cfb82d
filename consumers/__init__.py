"""Thin Channels consumers and the WebSocket routing."""
