"""Simulators of Zammad and the chat bot: real HTTP servers for development and tests."""
