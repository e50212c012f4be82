"""Runnable examples: the socketserver tutorial's servers and client on sockserve.

Each tutorial module is the tutorial's code with only the import changed to
``import sockserve.socketserver as socketserver``; run one with
``python -m sockserve.examples.tutorial_threading [HOST [PORT]]`` (default localhost 9999).
"""
