"""Integreat chat server: WebSocket and REST v3 chat bridged to Zammad and the chat bot."""
